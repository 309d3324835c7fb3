"""Pure domain logic. Its hot modules may run compiled (see ``streamproc/compiled.py``): never an outdated build."""

from streamproc.compiled import check_fresh

check_fresh()
