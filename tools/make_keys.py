"""Write a per-agent HMAC key file (`comm.key_file`): fresh random keys, readable by the owner only.

    python tools/make_keys.py --out keys/agents.json --ids 650 659 -1
    python tools/make_keys.py --out keys/sim.json --opv2v-root data/sim_opv2v   # every CAV folder of every split
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coperception.comm.keys import write_keys


def opv2v_agent_ids(root: Path) -> set[int]:
    """The integer CAV folder names under `<root>/<split>/<scenario>/`."""
    return {int(cav.name) for cav in root.glob("*/*/*") if cav.is_dir() and cav.name.lstrip("-").isdigit()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ids", type=int, nargs="*", default=[], help="Agent ids (roadside units are negative).")
    parser.add_argument("--opv2v-root", type=Path, help="Also every CAV id of an OPV2V-layout dataset.")
    args = parser.parse_args()
    ids = set(args.ids) | (opv2v_agent_ids(args.opv2v_root) if args.opv2v_root else set())
    if not ids:
        parser.error("no agent ids: give --ids or --opv2v-root")
    write_keys(args.out, sorted(ids))
    print(f"wrote {len(ids)} keys to {args.out} (mode 0600)")


if __name__ == "__main__":
    main()
