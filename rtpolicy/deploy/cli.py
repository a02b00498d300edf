"""``rtpolicy``: the deployment command line.

    rtpolicy deploy bundle=PATH [key=value ...] [autostart=false] [--ros-args ...]   the policy node
    rtpolicy sim task=reach-v3 [key=value ...] [--ros-args ...]                      a simulated robot
    rtpolicy record output=STORE.zarr [bag=PATH] [key=value ...] [--ros-args ...]    record demonstrations
    rtpolicy teleop task=reach-v3 [key=value ...] [--ros-args ...]                   a scripted teleoperator

``key=value`` sets a node parameter (values are read as JSON when they parse: numbers, true/false,
lists, objects); ``--ros-args`` and what follows go to ROS (e.g. ``--params-file rtpolicy/conf/deploy/metaworld.yaml``,
remappings). ``key=value`` wins over a params file. ``rtpolicy deploy --help`` lists the parameters.
"""

from __future__ import annotations

import sys

COMMANDS = {"deploy": "rtpolicy.deploy.node", "sim": "rtpolicy.deploy.sim_robot", "record": "rtpolicy.deploy.record",
            "teleop": "rtpolicy.deploy.teleop"}


def _usage() -> str:
    return __doc__.split("\n\n")[1]


def _help(command: str) -> str:
    import importlib

    table = importlib.import_module(COMMANDS[command]).PARAMETERS
    width = max(map(len, table))
    lines = [f"  {name:<{width}}  {default!r:<24} {desc}" for name, (default, desc) in table.items()]
    return f"rtpolicy {command} parameters (name, default, meaning):\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(f"usage:\n{_usage()}", file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    command, rest = args[0], args[1:]
    ours = rest[: rest.index("--ros-args")] if "--ros-args" in rest else rest
    if any(a in ("-h", "--help") for a in ours):
        print(_help(command))
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[command])
    try:
        return module.main(rest)
    except ValueError as e:  # bad key=value or parameter values: say which, no traceback
        print(f"rtpolicy {command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
