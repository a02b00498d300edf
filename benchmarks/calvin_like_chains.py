"""Issue 13 ablation: the CALVIN-style 5-chain score of the truncated 1-step task-id policy, one change at a time.

    python benchmarks/calvin_like_chains.py collect --dir data/calvin_like/ablation --workers 8 \
        --old-experts PATH_TO_PREVIOUS_experts.py      # git show 06b98e0:rtpolicy/envs/calvin_like/experts.py
    python benchmarks/calvin_like_chains.py run --setting +chains --seed 0 --steps 6000 --dir data/calvin_like/ablation \
        --out rows/chains_0.json
    python benchmarks/calvin_like_chains.py table rows/*.json --json benchmarks/calvin_like_chains.json

Settings (cumulative; each adds one change to the row before it):

| setting | store | obs key | normalizer hygiene |
|---|---|---|---|
| baseline | previous experts, 50 single-task demos per task, no noise | state (33,) | off |
| +normalizer | same | state | on (min range, clip, warning) |
| +features | same | state_rel (62,) | on |
| +reactive experts | re-planning experts, 50 single-task demos | state_rel | on |
| +DART | same experts, executed noise 0.2, clean labels | state_rel | on |
| +chains | + 300 expert 5-chains cut per subtask | state_rel | on |
| +chains, 4 actions per chunk | same, ``policy.action_horizon=4`` (re-plan every 4 steps instead of 8) | state_rel | on |
| +chains, 1 obs step | same, ``policy.obs_horizon=1`` (no two-step history to read the last action from) | state_rel | on |
| +features, 1 obs step / baseline, 1 obs step | the +features / baseline rows with ``policy.obs_horizon=1`` | | |

``run`` trains in-process (the ``train.py`` config with ``task=calvin_like_rel`` and the overrides shown in
each row's ``command``) and evaluates on ``--episodes`` chains (seeds 100000+); ``table`` averages the rows of
each setting over training seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl" if os.path.exists("/proc/driver/nvidia/version") else "osmesa")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STORES = {  # name -> (experts, task demos, chains, noise)
    "old": ("old", 50, 0, 0.0),
    "new": ("new", 50, 0, 0.0),
    "dart": ("new", 50, 0, 0.2),
    "chains": ("new", 50, 300, 0.2),
    "chains_obj": ("new", 50, 300, 0.2),  # the same store (same seeds) with the objects_rel key too
    "chains_tgt": ("new", 50, 300, 0.2),  # ... and target_rel
    # issue 13, second session: the rotate expert lets go as soon as the block has turned far enough (no
    # lowering first); place / stack / unstack aim at goals.block_goal; the store has the goal_rel key too
    "chains_goal": ("new", 50, 300, 0.2),
    "chains_goal_lang": ("new", 50, 300, 0.2),  # chains_goal_post (same seeds, 10 post-success steps); lang_emb from instruction_id
    "chains_goal_post": ("new", 50, 300, 0.2),  # chains_goal with 10 expert steps kept after each single-task success
    # issue 13, third session: twice the data (100 demos per task, 600 chains); lang_emb comes from instruction_id
    "chains_goal_post_x2": ("new", 100, 600, 0.2),
    # a camera store: static + gripper frames (64 px), proprio; the object state is stored but not read
    "chains_cam": ("new", 30, 150, 0.2),
    # issue 13, fourth session: the stores of the one-change-at-a-time rows (from the baseline's previous experts,
    # noise-free single-task demos) and of the leave-one-out rows (from the 3.23 recipe)
    "old_keys": ("old", 50, 0, 0.0),  # the baseline's store with the objects_rel / target_rel / goal_rel keys too
    "old_dart": ("old", 50, 0, 0.2),  # ... executed noise 0.2, clean labels
    "old_chains": ("old", 50, 300, 0.0),  # ... plus 300 expert 5-chains cut per subtask
    "old_post": ("old", 50, 0, 0.0),  # ... 10 post-success steps per demo
    "new_clean": ("new", 50, 0, 0.0),  # the re-planning experts (today's), noise-free single-task demos
    "chains_goal_post_clean": ("new", 50, 300, 0.0),  # chains_goal_post without DART noise
    "goal_post_nochains": ("new", 50, 0, 0.2),  # chains_goal_post without the chain data
    "old_post_chains": ("old", 50, 300, 0.2),  # chains_goal_post with the previous experts
}
STORE_IMAGE = {"chains_cam": 64}  # store -> side of its rgb_* frames
STORE_POST = {"old_post": 10, "old_post_chains": 10, "chains_goal_post_clean": 10, "goal_post_nochains": 10, "chains_goal_post": 10, "chains_goal_lang": 10, "chains_goal_post_x2": 10, "chains_cam": 10}  # store -> post-success steps of its single-task demos
STORE_KEYS = {"chains_obj": ["objects_rel"], "chains_tgt": ["objects_rel", "target_rel"],
              "chains_goal": ["objects_rel", "target_rel", "goal_rel"],
              "chains_goal_lang": ["objects_rel", "target_rel", "goal_rel"],
              "chains_goal_post": ["objects_rel", "target_rel", "goal_rel"],
              "chains_goal_post_x2": ["objects_rel", "target_rel", "goal_rel"],
              "chains_cam": ["proprio", "rgb_static", "rgb_gripper"]}
STORE_KEYS |= {name: ["objects_rel", "target_rel", "goal_rel"] for name in
               ("old_keys", "old_dart", "old_chains", "old_post", "new_clean", "chains_goal_post_clean", "goal_post_nochains",
                "old_post_chains")}
SETTINGS = {  # name -> (store, obs key, hygiene, extra overrides)
    "baseline": ("old", "state", False, []),
    "+normalizer": ("old", "state", True, []),
    "+features": ("old", "state_rel", True, []),
    "+reactive experts": ("new", "state_rel", True, []),
    "+DART": ("dart", "state_rel", True, []),
    "+chains": ("chains", "state_rel", True, []),
    "+chains, 4 actions per chunk": ("chains", "state_rel", True, ["policy.action_horizon=4"]),
    # one observation step instead of two: no velocity in the input to copy the previous action from
    "+chains, 1 obs step": ("chains", "state_rel", True, ["policy.obs_horizon=1"]),
    "+features, 1 obs step": ("old", "state_rel", True, ["policy.obs_horizon=1"]),
    "baseline, 1 obs step": ("old", "state", False, ["policy.obs_horizon=1"]),
    # ... and without the controller-offset dims either (objects_rel = state_rel less target - TCP)
    "+chains, 1 obs step, no command offsets": ("chains_obj", "objects_rel", True, ["policy.obs_horizon=1"]),
    # ... plus the current task's block in its own slot (target_rel)
    "+chains, 1 obs step, no command offsets, task block slot": ("chains_tgt", "objects_rel,target_rel", True, ["policy.obs_horizon=1"]),
    # ... with the rotate expert that lets go without lowering and place/stack experts aiming at goals.block_goal
    "+ rotate expert lets go at once": ("chains_goal", "objects_rel,target_rel", True, ["policy.obs_horizon=1"]),
    # ... plus the observable goal of the block (goal_rel: place/stack destination, rotate yaw still to turn)
    "+ rotate expert lets go at once, block goal (goal_rel)": ("chains_goal", "objects_rel,target_rel,goal_rel", True,
                                                              ["policy.obs_horizon=1"]),
    # ... plus 10 post-success steps per single-task demo (the release state becomes a training input)
    "+ rotate expert lets go at once, block goal, 10 post-success steps": ("chains_goal_post", "objects_rel,target_rel,goal_rel",
                                                                          True, ["policy.obs_horizon=1"]),
    # language-conditioned (MiniLM lang_emb, no task id). target_rel and goal_rel are computed by the env from the
    # current subtask, so this row is conditioned on the task through them as well as through the instruction
    "+ rotate expert lets go at once, block goal, language instead of task id": (
        "chains_goal_lang", "objects_rel,target_rel,goal_rel,lang_emb", True,
        ["policy.obs_horizon=1", "task.condition_on_task_id=false"]),
    # ... and from the instruction alone: no slot or goal that the env picks by the subtask
    "language only (objects_rel + lang_emb, no task-derived slots)": (
        "chains_goal_lang", "objects_rel,lang_emb", True, ["policy.obs_horizon=1", "task.condition_on_task_id=false"]),
    # issue 13, third session: the post-success row with twice the data (100 demos per task, 600 chains)
    "+ twice the data": ("chains_goal_post_x2", "objects_rel,target_rel,goal_rel", True, ["policy.obs_horizon=1"]),
    "+ twice the data, language instead of task id": ("chains_goal_post_x2", "objects_rel,target_rel,goal_rel,lang_emb", True,
                                                      ["policy.obs_horizon=1", "task.condition_on_task_id=false"]),
    "language only, twice the data (objects_rel + lang_emb, no task-derived slots)": (
        "chains_goal_post_x2", "objects_rel,lang_emb", True, ["policy.obs_horizon=1", "task.condition_on_task_id=false"]),
    # the camera policy: static + gripper cameras, proprio and the instruction; no object state, no task id
    "camera (static + gripper 64 px, proprio, language; no object state)": (
        "chains_cam", "rgb_static,rgb_gripper,proprio,lang_emb", True,
        ["policy.obs_horizon=1", "task.condition_on_task_id=false", "task.image_size=64", "policy.encoder.image_backbone=small_cnn",
         "train.batch_size=64"]),
}
# issue 13, fourth session. One change at a time from the baseline (previous experts, `state`, 2 obs steps, no
# hygiene), each row differing from "baseline" in exactly one thing ("+normalizer" and "baseline, 1 obs step" above
# are two of them) ...
BEST_KEYS = "objects_rel,target_rel,goal_rel"
SETTINGS |= {
    "one change: features (objects_rel + target_rel + goal_rel)": ("old_keys", BEST_KEYS, False, []),
    "one change: re-planning experts": ("new_clean", "state", False, []),
    "one change: DART 0.2": ("old_dart", "state", False, []),
    "one change: chain data": ("old_chains", "state", False, []),
    "one change: 10 post-success steps": ("old_post", "state", False, []),
}
# ... and one thing taken out of the 3.23 recipe ("+ rotate expert lets go at once, block goal, 10 post-success steps")
SETTINGS |= {
    "best without goal_rel": ("chains_goal_post", "objects_rel,target_rel", True, ["policy.obs_horizon=1"]),
    "best without target_rel": ("chains_goal_post", "objects_rel,goal_rel", True, ["policy.obs_horizon=1"]),
    "best without normalizer hygiene": ("chains_goal_post", BEST_KEYS, False, ["policy.obs_horizon=1"]),
    "best with 2 obs steps": ("chains_goal_post", BEST_KEYS, True, []),
    "best without DART": ("chains_goal_post_clean", BEST_KEYS, True, ["policy.obs_horizon=1"]),
    "best without chain data": ("goal_post_nochains", BEST_KEYS, True, ["policy.obs_horizon=1"]),
    "best without post-success steps": ("chains_goal", BEST_KEYS, True, ["policy.obs_horizon=1"]),
    "best with the previous experts": ("old_post_chains", BEST_KEYS, True, ["policy.obs_horizon=1"]),
}
# issue 13, fifth session: object slots (rtpolicy.policies.encoders.slots). The three blocks' 15 features at the end of
# objects_rel are slots that queries made from the instruction (or task id) attend over, instead of the env picking
# the block by the subtask (target_rel) and its goal (goal_rel)
SLOTS = ["policy.encoder.slot_key=objects_rel", "policy.encoder.slot_count=3", "policy.encoder.slot_size=15"]
SETTINGS |= {
    "language only, object slots (objects_rel + lang_emb, twice the data)": (
        "chains_goal_post_x2", "objects_rel,lang_emb", True, ["policy.obs_horizon=1", "task.condition_on_task_id=false", *SLOTS]),
    "task id, object slots, no target_rel / goal_rel": ("chains_goal_post", "objects_rel", True, ["policy.obs_horizon=1", *SLOTS]),
    "language only, object slots, normalized language token (twice the data)": (
        "chains_goal_post_x2", "objects_rel,lang_emb", True,
        ["policy.obs_horizon=1", "task.condition_on_task_id=false", "policy.encoder.lang_norm=true", *SLOTS]),
    "task id, object slots, no target_rel / goal_rel, without DART": ("chains_goal_post_clean", "objects_rel", True,
                                                                      ["policy.obs_horizon=1", *SLOTS]),
    # ... the instruction as MiniLM token ids through learned word embeddings (WordsToken) instead of the sentence embedding
    "language only, object slots, word embeddings (objects_rel + lang_tokens, twice the data)": (
        "chains_goal_post_x2", "objects_rel,lang_tokens", True, ["policy.obs_horizon=1", "task.condition_on_task_id=false", *SLOTS]),
}


def _use_old_experts(path: str) -> None:
    """Make ``CalvinLikeEnv.expert`` build the ScriptedExpert of the experts module at ``path`` (this process)."""
    from rtpolicy.envs.calvin_like.env import CalvinLikeEnv

    spec = importlib.util.spec_from_file_location("calvin_old_experts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    CalvinLikeEnv.expert = lambda self, noise=0.0, seed=None: module.ScriptedExpert(self, noise=noise, seed=seed)


def cmd_collect(a) -> None:
    from rtpolicy.envs.calvin_like.demos import collect

    names = a.stores or list(STORES)
    for name in names:
        experts, demos, chains, noise = STORES[name]
        demos, chains = a.demos or demos, min(chains, a.max_chains if a.max_chains is not None else chains)
        t0 = time.perf_counter()
        if experts == "old":
            if not a.old_experts:
                raise SystemExit("the 'old' store needs --old-experts (the previous experts.py)")
            _use_old_experts(a.old_experts)
        keys = ["state", "state_rel", *STORE_KEYS.get(name, [])]
        info = collect(Path(a.dir) / f"{name}.zarr", keys, demos, chains, noise, seed=0,
                       workers=1 if experts == "old" else a.workers, post_success_steps=STORE_POST.get(name, 0),
                       image_size=STORE_IMAGE.get(name, 84))
        print(f"{name}: {info['episodes']} episodes, {info['steps']} steps in {time.perf_counter() - t0:.0f} s", flush=True)


def overrides(setting: str, seed: int, steps: int, episodes: int, data_dir: str, run_dir: str, device: str) -> list[str]:
    store, key, _, extra = SETTINGS[setting]
    return ["task=calvin_like_rel", f"task.dataset={Path(data_dir) / (store + '.zarr')}", f"task.obs_keys=[{key}]",
            "policy=truncated", f"train.steps={steps}", f"train.seed={seed}", "train.threads=1",
            f"eval.episodes={episodes}", "eval.num_envs=2", "eval.latency_reps=5", f"run_dir={run_dir}", f"device={device}", *extra]


def cmd_run(a) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    import rtpolicy.datasets.normalizer as N
    from rtpolicy.config import register_configs
    from rtpolicy.factory import CONF_DIR
    from rtpolicy.training import train

    torch.set_num_threads(1)
    _, _, hygiene, _ = SETTINGS[a.setting]
    if not hygiene:  # the normalizer before issue 13
        N.MIN_RANGE, N.CLIP, N.WARN_AT = None, dict.fromkeys(N.MODES), dict.fromkeys(N.MODES)
    register_configs()
    over = overrides(a.setting, a.seed, a.steps, a.episodes, a.dir, a.run_dir, a.device) + ["resume=true"] * a.resume
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=over)
    t0 = time.process_time()
    res = train(cfg)
    if a.episodes == 0:  # a timing run
        Path(a.out).write_text(json.dumps({"train_seconds": res["train_seconds"], "steps": a.steps}))
        return
    row = {"setting": a.setting, "seed": a.seed, "avg_chain_length": res["avg_chain_length"], "episodes": res["episodes"],
           "success_at": res["chain_success"], "train_steps": a.steps, "train_seconds": res["train_seconds"],
           "train_cpu_minutes": round(res["train_seconds"] / 60, 2), "process_cpu_minutes": round((time.process_time() - t0) / 60, 2),
           "device": a.device, "command": "python train.py " + " ".join(f"'{o}'" if "[" in o else o for o in over)
           + ("  # normalizer hygiene off" if not hygiene else "")}
    row["subtask_kinds"] = subtask_kinds(json.loads((Path(a.run_dir) / "eval" / "results.json").read_text())["per_episode"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=2))
    print(json.dumps({k: row[k] for k in ("setting", "seed", "avg_chain_length", "success_at", "train_seconds")}), flush=True)
    if a.single_tasks:  # single-task success of every block task, same checkpoint
        row["single_task"] = single_task_success(res["checkpoint"], cfg, a.single_tasks, a.device)
        Path(a.out).write_text(json.dumps(row, indent=2))
        print(json.dumps(row["single_task"]), flush=True)


def subtask_kinds(per_episode: list[dict]) -> dict[str, str]:
    """{kind of subtask: "solved/attempted"} over the chains of an evaluation (each chain's subtasks up to its
    first failure; the chain of a seed is the env's), kinds: fixture, push, lift, rotate, place/stack."""
    from collections import Counter

    from rtpolicy.envs.calvin_like.env import CalvinLikeEnv

    def kind(t: str) -> str:
        for k in ("push", "lift", "rotate"):
            if t.startswith(k):
                return k
        return "place/stack" if t.startswith(("place", "stack", "unstack")) else "fixture"

    env = CalvinLikeEnv({"name": "chain5"}, seed=0)
    tried, solved = Counter(), Counter()
    for e in per_episode:
        env.reset(seed=e["seed"])
        for i, t in enumerate(env.chain[: e["completed"] + 1]):
            tried[kind(t)] += 1
            solved[kind(t)] += i < e["completed"]
    return {k: f"{solved[k]}/{tried[k]}" for k in ("fixture", "push", "lift", "rotate", "place/stack") if tried[k]}


BLOCK_MOVES = ("place", "stack", "unstack")  # block tasks without a colour in the name


def single_task_success(checkpoint: str, cfg, episodes: int, device: str) -> dict[str, float]:
    """{block task: success over ``episodes`` single-task episodes (seeds 100000+, 150 steps)}: push, lift, rotate
    and the place / stack / unstack tasks."""
    from rtpolicy.checkpoint import load_policy
    from rtpolicy.envs.calvin_like.tasks import TASKS, task_block
    from rtpolicy.evaluation import EvalSpec, evaluate
    from rtpolicy.training import resolve_device

    dev = resolve_device(device)
    policy, _ = load_policy(checkpoint, dev)
    policy.eval()
    eval_cfg = EvalSpec(episodes=episodes, num_envs=2, seed=100_000, latency_reps=1)
    out = {}
    for i, t in enumerate(TASKS):
        if task_block(t) is None and not t.startswith(BLOCK_MOVES):
            continue
        fields = {"env": "calvin_like", "name": t, "num_tasks": len(TASKS), "task_id": i,
                  "obs_keys": list(cfg.task.obs_keys), "max_episode_steps": int(cfg.task.max_episode_steps)}
        out[t] = evaluate(policy, fields, eval_cfg, device=dev, progress=False)["success"]
    return out


def cmd_single(a) -> None:
    """Single-task success of every block task for a trained row's checkpoint, written into the row."""
    import torch
    from omegaconf import OmegaConf

    from rtpolicy.checkpoint import read_checkpoint

    torch.set_num_threads(1)
    row = json.loads(Path(a.row).read_text())
    ckpt = Path(a.run_dir) / "checkpoints" / "last.safetensors"
    cfg = OmegaConf.create(read_checkpoint(ckpt)[0]["config"])
    row["single_task"] = single_task_success(str(ckpt), cfg, a.episodes, a.device)
    Path(a.row).write_text(json.dumps(row, indent=2))
    print(json.dumps(row["single_task"]), flush=True)


def cmd_table(a) -> None:
    import numpy as np

    rows = [json.loads(Path(p).read_text()) for p in a.rows]
    out = []
    names = list(dict.fromkeys([r["setting"] for r in rows if r["setting"] not in SETTINGS] + list(SETTINGS)))
    groups = [(n, steps) for n in names for steps in sorted({r["train_steps"] for r in rows if r["setting"] == n})]
    for setting, steps in groups:  # rows of one setting and budget; their seeds are averaged
        rs = [r for r in rows if r["setting"] == setting and r["train_steps"] == steps]
        acl = [r["avg_chain_length"] for r in rs]
        out.append({"setting": setting, "avg_chain_length": round(float(np.mean(acl)), 3),
                    "avg_chain_length_per_seed": acl, "seeds": len(rs), "episodes": rs[0]["episodes"],
                    "success_at": [round(float(v), 3) for v in np.mean([r["success_at"] for r in rs], axis=0)],
                    "train_cpu_minutes": round(float(np.mean([r["train_cpu_minutes"] for r in rs])), 2),
                    "train_steps": rs[0]["train_steps"], "device": rs[0]["device"], "command": rs[0]["command"]}
                   | {k: rs[0][k] for k in ("subtask_kinds", "single_task", "note") if k in rs[0]})
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": out, "extra": a.extra and json.loads(Path(a.extra).read_text())}, indent=2) + "\n")
    print("| setting | steps | seeds | chains per seed | success at 1 / 2 / 3 / 4 / 5 | average chain length (per seed) |")
    print("|---|---|---|---|---|---|")
    for r in out:
        per = ", ".join(f"{v:.2f}" for v in r["avg_chain_length_per_seed"])
        print(f"| {r['setting']} | {r['train_steps']} | {r['seeds']} | {r['episodes']} | {' / '.join(f'{v:.2f}' for v in r['success_at'])} | "
              f"**{r['avg_chain_length']:.2f}** ({per}) |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--dir", required=True)
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--old-experts", default=None)
    c.add_argument("--stores", nargs="*", choices=list(STORES))
    c.add_argument("--demos", type=int, default=None, help="single-task demos per task (smoke tests)")
    c.add_argument("--max-chains", type=int, default=None, help="at most this many chains (smoke tests)")
    r = sub.add_parser("run")
    r.add_argument("--setting", required=True, choices=list(SETTINGS))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=6000)
    r.add_argument("--episodes", type=int, default=200)
    r.add_argument("--dir", required=True, help="folder of the stores")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--device", default="auto")
    r.add_argument("--out", required=True)
    r.add_argument("--resume", action="store_true", help="continue the run in --run-dir up to --steps (train.py resume=true)")
    r.add_argument("--single-tasks", type=int, default=0, help="also evaluate each block task alone for this many episodes")
    g = sub.add_parser("single", help="(re)measure a row's single-task block success from its run's checkpoint")
    g.add_argument("--row", required=True)
    g.add_argument("--run-dir", required=True)
    g.add_argument("--episodes", type=int, default=10)
    g.add_argument("--device", default="cpu")
    t = sub.add_parser("table")
    t.add_argument("rows", nargs="+")
    t.add_argument("--json", default=None)
    t.add_argument("--extra", default=None, help="a JSON file added under 'extra' (e.g. per-task success)")
    a = p.parse_args(argv)
    {"collect": cmd_collect, "run": cmd_run, "single": cmd_single, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
