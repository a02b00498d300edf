"""Convert demonstrations between zarr, LeRobot v3 and robomimic HDF5, and from ROS 2 bags.

    rtpolicy-convert SRC DST [--from FMT] [--to FMT] [--keys JSON] [--options JSON|YAML file] [--overwrite]
    python -m rtpolicy.datasets.convert data/metaworld/reach-v3.zarr out/reach-lerobot
    python -m rtpolicy.datasets.convert demos.hdf5 demos.zarr
    python -m rtpolicy.datasets.convert recording/ demos.zarr --options bag.yaml   # sources, rate, split, ...

SRC's format is detected (``--from`` names it); DST's comes from its ending (``.zarr``, ``.hdf5``/``.h5``;
anything else is a LeRobot folder) or ``--to``. ``--keys`` maps our key -> a source key or list of keys
(concatenated). DST is written beside itself and renamed at the end; an existing DST is refused without
``--overwrite``; the source is only read. Bad input: one ``error:`` line naming the file, key and episode, exit
status 2 (``--traceback`` keeps the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _mapping(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object given inline, or a JSON/YAML file holding one."""
    from rtpolicy.datasets.formats import FormatError

    if not text:
        return {}
    p = Path(text)
    if p.is_file():
        import yaml

        try:
            value = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise FormatError(f"{what} {p}: not YAML/JSON ({' '.join(str(e).split())})") from e
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{what} is neither a file nor a JSON object ({e})") from e
    if not isinstance(value, dict):
        raise FormatError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    from rtpolicy.datasets.formats import FORMATS, convert, format_for_new_path
    from rtpolicy.errors import reported

    ap = argparse.ArgumentParser(prog="rtpolicy-convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="source dataset (zarr store, LeRobot v3 folder, robomimic .hdf5, rosbag2 bag or folder of bags)")
    ap.add_argument("dst", help="destination (must not exist unless --overwrite)")
    ap.add_argument("--from", dest="src_format", choices=FORMATS.names(), help="source format (default: detected)")
    ap.add_argument("--to", dest="dst_format", choices=[n for n, e in FORMATS.items() if e.cls.writable()], help="destination format (default: from DST's ending)")
    ap.add_argument("--keys", help="JSON (or a file): our key -> source key or list of source keys")
    ap.add_argument("--options", help="JSON (or a JSON/YAML file): reader options, e.g. a bag's sources, rate, max_age, split")
    ap.add_argument("--vcodec", default="h264", help="LeRobot video codec (h264, hevc, libsvtav1); default h264")
    ap.add_argument("--crf", type=int, default=18, help="LeRobot video quality (lower is better); default 18")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing DST (atomically, at the end)")
    ap.add_argument("--traceback", action="store_true", help="show the traceback of an error, not only its line")
    args = ap.parse_args(argv)
    if args.traceback:
        os.environ["RTPOLICY_TRACEBACK"] = "1"
    with reported():  # expected errors: one line on stderr, exit status 2
        keys = _mapping(args.keys, "--keys")
        options = _mapping(args.options, "--options")
        dst_format = args.dst_format or format_for_new_path(args.dst)
        write_options = {"vcodec": args.vcodec, "crf": args.crf} if dst_format == "lerobot" else {}
        src_fmt, dst_fmt = convert(args.src, args.dst, args.src_format, dst_format, keys, args.overwrite, options, write_options)
    print(f"{args.src} ({src_fmt}) -> {args.dst} ({dst_fmt})")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
