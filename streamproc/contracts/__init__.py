"""What streamproc publishes about its topics, shipped with the package (so an installed worker finds them):
``topics.toml``, every topic it reads or writes, and ``schemas/``, the JSON Schema of each record, generated
from the message models (``streamproc topics schemas``)."""

from pathlib import Path

CONTRACTS_DIR = Path(__file__).resolve().parent
TOPICS_FILE = CONTRACTS_DIR / "topics.toml"
SCHEMAS_DIR = CONTRACTS_DIR / "schemas"
