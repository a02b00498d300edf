"""An ONNX Runtime backend for bundles: the whole chunk as one ONNX graph.

``export --onnx`` writes ``policy.onnx``: observation tensors (raw units, batch 1) and the sampling noise
in, the actions to execute out; normalization, the observation encoder, the sampler loop (unrolled) and
unnormalization are inside. The noise a head draws (initial noise, anchor noise, DDPM step noise, the
Gumbel draw of ``mode_select=sample``) is a graph input, so a given noise gives one output and parity with
the eager head is testable. A streaming head exports its per-tick step with the buffer as input and
output (``policy.onnx``) and its warm start (``warm_start.onnx``).

    graph inputs   <obs key> (1, To, *shape) [, task_id (1,) int64] [, buffer (1, H, Da)], noise_<i> (shape_i)
    graph outputs  actions (1, Ha, Da) [, next_buffer (1, H, Da)]

:class:`OrtPolicy` runs the graphs with the Policy interface the runner and the node call
(``reset``, ``predict_chunk``, ``obs_horizon``, ``action_horizon``), drawing the noise with torch's RNG.
onnxruntime is an optional extra (``pip install -e '.[ort]'``); without it the torch path stays.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rtpolicy.policies.head import NoiseDraws, NoiseFeed

ONNX_FILE = "policy.onnx"
WARM_FILE = "warm_start.onnx"
OPSET = 17
PARITY_ATOL = 1e-4  # max abs difference of ORT vs eager actions for the same noise (issue 19)


class OnnxExportError(ValueError):
    pass


def example_obs(policy, batch: int = 1) -> dict[str, torch.Tensor]:
    """Zero observations of the policy's keys and shapes (raw units): (B, To, *shape), task_id (B,)."""
    obs = {}
    for k, shape in policy.obs_shapes.items():
        dtype = torch.long if k == "lang_tokens" else torch.uint8 if len(shape) == 3 else torch.float32
        obs[k] = torch.zeros(batch, policy.obs_horizon, *shape, dtype=dtype)
    if getattr(policy, "num_tasks", 0):
        obs["task_id"] = torch.zeros(batch, dtype=torch.long)
    return obs


def is_streaming(policy) -> bool:
    return hasattr(policy, "tick") and hasattr(policy, "warm_start")


class _Graph(nn.Module):
    """``policy`` as a function of (obs tensors..., [buffer], noise...) for one export."""

    def __init__(self, policy, keys: list[str], kind: str):
        super().__init__()
        self.policy, self.keys, self.kind = policy, keys, kind
        # eval, like the policy: torch.onnx.export traces in eval mode and then restores the *wrapper's* mode
        # recursively, so a wrapper left in train mode would switch the policy to train mode (random crops)
        self.eval()

    def forward(self, *inputs: torch.Tensor):
        obs = dict(zip(self.keys, inputs[: len(self.keys)]))
        rest = list(inputs[len(self.keys):])
        buffer = rest.pop(0) if self.kind == "tick" else None
        p = self.policy
        with p.noise_feed(NoiseFeed(rest, check=False)):
            if self.kind == "chunk":
                p.reset()
                return p.predict_chunk(obs)
            cond = p.encode(obs)
            if self.kind == "warm":
                return p.warm_start(cond)
            return p.tick(cond, buffer)


def _noise_shapes(policy, kind: str, obs: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The shapes of the noise tensors one call of ``kind`` draws, in order (recorded on a real call)."""
    feed = NoiseFeed()
    with torch.no_grad(), policy.noise_feed(feed):
        if kind == "chunk":
            policy.reset()
            policy.predict_chunk(obs)
        else:
            cond = policy.encode(obs)
            buffer = policy.warm_start(cond)
            if kind == "tick":
                feed.drawn.clear()
                policy.tick(cond, buffer)
    policy.reset()
    return [tuple(x.shape) for x in feed.drawn]


def _mish(g, x):
    """Mish as x * n / (n + 2), n = e^x (e^x + 2) (= x * tanh(softplus(x)) exactly; e^x capped at e^20, where
    n / (n + 2) is 1 in float32). The exporter's Softplus -> Tanh form is correct but ORT's Softplus kernel is
    scalar: on the small-CNN camera policy it was 45% of the graph's CPU time."""
    e = g.op("Exp", g.op("Min", x, g.op("Constant", value_t=torch.tensor(20.0))))
    n = g.op("Mul", e, g.op("Add", e, g.op("Constant", value_t=torch.tensor(2.0))))
    return g.op("Mul", x, g.op("Div", n, g.op("Add", n, g.op("Constant", value_t=torch.tensor(2.0)))))


def export_graph(policy, path: Path, kind: str = "chunk") -> dict[str, Any]:
    """Write one graph (``chunk``, or a streaming head's ``tick`` / ``warm``) to ``path``; check it against
    the eager head on random observations and noise; return its bundle entry."""
    import onnx

    from rtpolicy.checkpoint import atomic_path

    policy = policy.eval()
    obs = example_obs(policy)
    keys = list(obs)
    shapes = _noise_shapes(policy, kind, obs)
    graph = _Graph(policy, keys, kind)
    buffer = [torch.zeros(1, policy.horizon, policy.action_dim)] if kind == "tick" else []
    args = tuple([*obs.values(), *buffer, *[torch.zeros(s) for s in shapes]])
    names = [*keys, *(["buffer"] if buffer else []), *[f"noise_{i}" for i in range(len(shapes))]]
    outputs = {"chunk": ["actions"], "warm": ["buffer"], "tick": ["actions", "next_buffer"]}[kind]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python scalars it freezes (the unrolled schedule)
        torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused kernel has no ONNX form
        torch.onnx.register_custom_op_symbolic("aten::mish", _mish, OPSET)
        try:
            torch.onnx.export(graph, args, str(tmp), input_names=names, output_names=outputs, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
        except Exception as e:
            raise OnnxExportError(f"ONNX export of the {type(policy).__name__} {kind} graph failed: {e}") from e
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            torch.onnx.unregister_custom_op_symbolic("aten::mish", OPSET)
        assert not policy.training, "the export left the policy in train mode"
        onnx.checker.check_model(str(tmp))
    diff = check_parity(policy, path, kind, shapes)
    return {"file": path.name, "kind": kind, "opset": OPSET, "inputs": names, "outputs": outputs,
            "noise_shapes": [list(s) for s in shapes], "parity_max_abs": diff}


def check_parity(policy, path: Path, kind: str, shapes: list[tuple[int, ...]], trials: int = 2) -> float:
    """Max abs difference between ORT and the eager head for the same random observations and noise
    (``shapes``: the noise tensors one call draws, from :func:`_noise_shapes`)."""
    session = make_session(path)
    names = [i.name for i in session.get_inputs()]
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(trials):
        obs = {k: _random_like(v, k, policy, gen) for k, v in example_obs(policy).items()}
        noise = [torch.randn(s, generator=gen) for s in shapes]
        buffer = [torch.randn(1, policy.horizon, policy.action_dim, generator=gen)] if kind == "tick" else []
        with torch.no_grad():
            want = _Graph(policy, list(obs), kind)(*obs.values(), *buffer, *noise)
        got = session.run(None, dict(zip(names, [t.numpy() for t in (*obs.values(), *buffer, *noise)])))
        want = want if isinstance(want, tuple) else (want,)
        worst = max(worst, *(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)))
    if not worst <= PARITY_ATOL:
        raise OnnxExportError(f"{path.name}: ONNX Runtime differs from the eager head by {worst:.3g} > {PARITY_ATOL}")
    return worst


def _random_like(x: torch.Tensor, key: str, policy, gen) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return torch.randint(0, 256, x.shape, generator=gen, dtype=torch.uint8)
    if x.dtype == torch.long:
        high = getattr(policy, "num_tasks", 0) if key == "task_id" else 2
        return torch.randint(0, max(1, high), x.shape, generator=gen)
    return torch.randn(x.shape, generator=gen)


def export_onnx(policy, out_dir: Path) -> dict[str, Any]:
    """All graphs of ``policy`` into the bundle folder; the bundle.json entry ``onnx``."""
    if is_streaming(policy):
        return {"tick": export_graph(policy, out_dir / ONNX_FILE, "tick"), "warm": export_graph(policy, out_dir / WARM_FILE, "warm")}
    return {"chunk": export_graph(policy, out_dir / ONNX_FILE, "chunk")}


def make_session(path: Path, threads: int = 1, spinning: bool = False):
    """An ORT session for a robot computer: ``threads`` intra-op threads, one inter-op thread, and worker
    threads that sleep instead of spinning between calls (spinning would steal the control timer's core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OrtPolicy(NoiseDraws):
    """A bundle's ONNX graphs behind the Policy interface (batch 1): ``reset()``, ``predict_chunk(obs)``."""

    def __init__(self, bundle_dir: str | Path, bundle: dict[str, Any], threads: int = 1, spinning: bool = False):
        from rtpolicy.deploy.export import BundleError, _sha256

        d = Path(bundle_dir)
        entry = bundle.get("onnx")
        if not entry:
            raise BundleError(f"{d}: the bundle has no ONNX graph (export it with --onnx)")
        self.sessions = {}
        for kind, graph in entry.items():
            path = d / graph["file"]
            if graph["file"] not in (ONNX_FILE, WARM_FILE) or not path.is_file():
                raise BundleError(f"{d}: ONNX graph {graph['file']!r} is missing or not a bundle file")
            if _sha256(path) != graph.get("sha256"):
                raise BundleError(f"{path}: SHA-256 does not match bundle.json; the graph was changed or truncated")
            self.sessions[kind] = (make_session(path, threads, spinning), graph)
        h = bundle["horizons"]
        self.obs_horizon, self.action_horizon, self.horizon = int(h["obs"]), int(h["action"]), int(h["chunk"])
        self.obs_shapes = {k: list(v) for k, v in bundle["shapes"].items() if k != "action"}
        self.action_dim = int(bundle["shapes"]["action"][0])
        self.num_tasks = int(bundle.get("num_tasks") or 0)
        from rtpolicy.processors import ObservationProcessor

        self.processor = ObservationProcessor.from_config(bundle.get("processor"))  # raw obs -> graph inputs
        self.buffer: list[np.ndarray | None] | None = None

    @classmethod
    def from_policy(cls, policy, folder: str | Path, threads: int = 1) -> OrtPolicy:
        """Export ``policy``'s graphs into ``folder`` and run them (eval.py's ``eval.runtime=ort``)."""
        from rtpolicy.deploy.export import _sha256

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        graphs = export_onnx(policy, folder)
        bundle = {"onnx": {k: g | {"sha256": _sha256(folder / g["file"])} for k, g in graphs.items()},
                  "horizons": {"obs": policy.obs_horizon, "action": policy.action_horizon, "chunk": policy.horizon},
                  "shapes": policy.obs_shapes | {"action": [policy.action_dim]}, "num_tasks": policy.num_tasks,
                  "processor": policy.processor.config()}
        return cls(folder, bundle, threads=threads)

    def reset(self) -> None:
        self.buffer = None

    def eval(self) -> OrtPolicy:
        return self

    def to(self, *_args, **_kwargs) -> OrtPolicy:
        return self

    def _run(self, kind: str, obs: dict[str, torch.Tensor], *state: np.ndarray) -> list[np.ndarray]:
        session, graph = self.sessions[kind]
        feeds = {}
        inputs = [i.name for i in session.get_inputs()]
        for name in inputs:
            if name in obs:
                x = obs[name]
                x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                if name in self.obs_shapes and x.dtype.kind == "f":
                    x = x.astype(np.float32)
                    if not np.isfinite(x).all():
                        raise ValueError(f"observation {name!r} has a non-finite value")
                feeds[name] = x
        if "buffer" in inputs:
            feeds["buffer"] = state[0]
        for i, shape in enumerate(graph["noise_shapes"]):
            feeds[f"noise_{i}"] = self.randn(*shape).numpy()
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise ValueError(f"observation is missing keys {missing}; got {sorted(obs)}")
        return session.run(None, feeds)

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """obs {key: (B, To, *shape)} -> actions (B, Ha, Da); the graphs take batch 1, so rows run in turn
        (a streaming head keeps one buffer per row)."""
        b = next(iter(obs.values())).shape[0]
        rows = []
        if "tick" in self.sessions and (self.buffer is None or len(self.buffer) != b):
            self.buffer = [None] * b
        for i in range(b):
            row = {k: v[i:i + 1] for k, v in obs.items()}
            if "tick" in self.sessions:
                if self.buffer[i] is None:
                    self.buffer[i] = self._run("warm", row)[0]
                actions, self.buffer[i] = self._run("tick", row, self.buffer[i])
            else:
                actions = self._run("chunk", row)[0]
            rows.append(torch.from_numpy(actions))
        return torch.cat(rows)
