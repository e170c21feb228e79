"""A separate process racing for a claim: `python -m tests.dedup.claim_worker DB_TYPE DB_STR KEY OWNER START_AT`.

Waits until wall-clock START_AT (so all racers fire together), claims KEY for 30 s, prints WON or LOST.
"""

from __future__ import annotations

import sys
import time

from obdconv.dedup.store import open_store


def main(argv: list[str]) -> int:
    db_type, db_str, key, owner, start_at = argv
    store = open_store(db_type, db_str, required=True)
    store.holder(key)  # connect before the start line, so the race is on the claim itself
    time.sleep(max(0.0, float(start_at) - time.time()))
    won = store.claim(key, owner, ttl=30)
    print("WON" if won else "LOST", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
