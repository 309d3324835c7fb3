"""The batch step around the pure domain: decode, group, load, fold and score, save (with the outputs parked in
the same write), the inactivity sweep, and the one factory that builds it for every caller."""
