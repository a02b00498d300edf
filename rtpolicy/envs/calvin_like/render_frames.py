"""Save one static-camera and one gripper-camera frame of the CALVIN-like scene as PNGs.

    MUJOCO_GL=osmesa python -m rtpolicy.envs.calvin_like.render_frames --out docs/img

Writes ``calvin_like_<scene>_static.png`` and ``calvin_like_<scene>_gripper.png`` (``--size`` px square),
taken ``--steps`` expert steps into a seeded episode of ``--task`` (default: the bulb on, a block lifted).
"""

from __future__ import annotations

import argparse
import os

from rtpolicy.envs.gl import configure_gl

configure_gl()  # before mujoco is imported


def main(argv=None) -> list[str]:
    import imageio.v3 as iio

    from rtpolicy.envs.calvin_like.env import CalvinLikeEnv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img")
    p.add_argument("--scene", default="A")
    p.add_argument("--task", default="lift_red_block_table")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--steps", type=int, default=22, help="expert steps before the snapshot")
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    env = CalvinLikeEnv({"name": args.task, "max_episode_steps": 400}, seed=args.seed, scene=args.scene, render=True,
                        width=args.size, height=args.size)
    expert = env.expert()
    obs, _ = env.reset(seed=args.seed)
    for _ in range(args.steps):
        obs, _, term, trunc, _ = env.step(expert(obs))
        if term or trunc:
            break
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for cam in ("static", "gripper"):
        path = os.path.join(args.out, f"calvin_like_{args.scene}_{cam}.png")
        iio.imwrite(path, env.render_camera(cam))
        paths.append(path)
        print(f"wrote {path}")
    env.close()
    return paths


if __name__ == "__main__":
    main()
