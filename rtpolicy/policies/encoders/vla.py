"""VLA observation encoder: a pretrained transformer reads camera, state and instruction tokens together.

The TinyVLA / Diffusion-VLA pattern as an observation encoder, so every denoising head (diffusion, edm,
truncated, streaming) becomes a VLA decoder without changes: the backbone's output tokens, projected to
``cond_dim``, are the head's condition tokens.

    obs[image key]     (B, To, H, W, 3) uint8   -> ImageEncoder at the backbone width      C*To tokens
    obs[vector keys]   (B, To, D_k) normalized  -> StateEncoder at the backbone width      To tokens
    task_id            (B,) long                -> learned task token                       1 token (num_tasks > 0)
    obs["lang_tokens"] (B, To, L) or (B, L) long, 0 = pad -> the backbone's word embeddings  L tokens
    sequence [images ; state ; task ; words] -> backbone (attention mask hides pads) -> outputs
    ->  (B, N, cond_dim): the outputs at the image/state/task positions, then the masked mean of the
        word outputs (one language token); N = C*To + To + (task) + (language)

Instructions become token ids before they reach the policy (:func:`tokenize_instructions`, cached per
string), so the heads never run a tokenizer. The backbone is any local ``transformers`` checkpoint
folder whose base model takes ``inputs_embeds`` and ``attention_mask`` (bidirectional encoders such as
BERT/MiniLM; tested with the packaged all-MiniLM-L6-v2, ``vla_backbone: minilm``).

Fine-tuning (``vla_tuning``): ``frozen`` trains only the projections (image/state/task encoders, the
output projection, the null language token); ``lora`` adds rank-r adapters to the attention
query/value linears and freezes every base weight; ``full`` trains everything.

``python -m rtpolicy.policies.encoders.vla --report`` prints parameter counts and batch-1 latency.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtpolicy.policies.encoders.language import new_texts
from rtpolicy.policies.encoders.observation import TOKENS_KEY, TaskToken, _opt, build_image_encoder, split_keys
from rtpolicy.policies.encoders.state import StateEncoder

TUNINGS = ("frozen", "lora", "full")
# names of the attention query/value linears in common Hugging Face models: BERT, DistilBERT, Llama-style
LORA_TARGETS = ("query", "value", "q_lin", "v_lin", "q_proj", "v_proj")


def resolve_backbone(name: str | os.PathLike) -> Path:
    """'minilm' -> the packaged all-MiniLM-L6-v2 folder; anything else must be a local checkpoint folder."""
    if str(name) == "minilm":
        from rtpolicy.policies.encoders.language import minilm_path

        return minilm_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"VLA backbone {str(name)!r} is not a local transformers checkpoint folder (no {path / 'config.json'});"
            " use 'minilm' or the path of a folder written by save_pretrained"
        )
    return path


def load_backbone(name: str | os.PathLike) -> nn.Module:
    """The base model (no task head, no pooler) of a local checkpoint, loaded offline."""
    path = resolve_backbone(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load VLA backbone from {str(path)!r}: {e}") from e
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's [CLS] pooler: unused here, and its weights would never get a gradient
    return model


class InstructionTokenizer:
    """Instruction strings -> (N, max_len) long token ids, 0 = pad, tokenized once per string.

    ``calls`` counts tokenizer invocations; the tokenizer loads on first use.
    """

    def __init__(self, path: str | os.PathLike, max_len: int):
        if max_len < 2:
            raise ValueError(f"lang_tokens_len must be >= 2 (room for the special tokens), got {max_len}")
        self.path, self.max_len = resolve_backbone(path), int(max_len)
        self.calls = 0
        self._tokenizer = None
        self._table: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts, new = new_texts(texts, self._table)
        if new:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            enc = self._tokenizer(new, padding="max_length", truncation=True, max_length=self.max_len,
                                  return_tensors="pt")
            self.calls += 1
            ids = enc["input_ids"].long() * enc["attention_mask"].long()  # pads -> 0 whatever the pad id
            self._table.update(zip(new, ids))
        return torch.stack([self._table[t] for t in texts]).clone()


@functools.lru_cache(maxsize=8)
def instruction_tokenizer(backbone: str, max_len: int) -> InstructionTokenizer:
    """The shared :class:`InstructionTokenizer` of a backbone (name or path) and length."""
    return InstructionTokenizer(backbone, max_len)


def tokenize_instructions(texts: Sequence[str], backbone: str = "minilm", max_len: int = 16) -> torch.Tensor:
    """Instruction strings (B of them) -> obs["lang_tokens"] (B, max_len) long, 0 = pad; cached per string."""
    return instruction_tokenizer(str(backbone), int(max_len))(texts)


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T) B^T * alpha / r with the base Linear frozen; B starts at zero, so y = base(x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scale


def add_lora(model: nn.Module, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Freeze ``model`` and wrap every nn.Linear named in ``targets`` with a LoRALinear (in place); returns
    how many were wrapped (ValueError for none)."""
    model.requires_grad_(False)
    found = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"no attention linear named {', '.join(targets)} in {type(model).__name__}: cannot add LoRA")
    for name, module in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(module, rank))
    return len(found)


class VLAEncoder(nn.Module):
    """Image + state (+ task) + instruction tokens through a pretrained transformer -> (B, N, dim); see the module doc.

    ``cfg``: an EncoderConfig; ``vla_backbone`` must be set. ``backbone`` (a loaded model) skips loading.
    """

    def __init__(self, shapes: dict[str, list[int]], obs_horizon: int, dim: int, num_tasks: int = 0, cfg: Any = None,
                 backbone: nn.Module | None = None):
        super().__init__()
        name = _opt(cfg, "vla_backbone", "")
        tuning = _opt(cfg, "vla_tuning", "lora")
        if tuning not in TUNINGS:
            raise ValueError(f"policy.encoder.vla_tuning must be one of {', '.join(TUNINGS)}, got {tuning!r}")
        vector, image, lang = split_keys(shapes, _opt(cfg, "lang_key", "lang_emb"))
        if not vector and not image:
            raise ValueError(f"the VLA policy needs at least one vector or image obs key; got {sorted(shapes)}")
        if lang is not None and lang != TOKENS_KEY:
            raise ValueError(f"the VLA encoder reads instruction token ids from obs[{TOKENS_KEY!r}], not {lang!r}; "
                             f"write them with rtpolicy.policies.encoders.vla.tokenize_instructions")
        self.lang_len = int(shapes[lang][0]) if lang else 0
        if lang and self.lang_len != int(_opt(cfg, "lang_tokens_len", self.lang_len)):
            raise ValueError(f"obs[{TOKENS_KEY!r}] holds {self.lang_len} token ids per instruction but "
                             f"policy.encoder.lang_tokens_len is {cfg.lang_tokens_len}")
        if backbone is None:
            if not name:
                raise ValueError("VLAEncoder needs policy.encoder.vla_backbone ('minilm' or a checkpoint folder)")
            backbone = load_backbone(name)
        self.backbone = backbone
        width = int(backbone.config.hidden_size)
        if tuning == "frozen":
            backbone.requires_grad_(False)
        elif tuning == "lora":
            add_lora(backbone, int(_opt(cfg, "lora_rank", 8)))
        self.tuning = tuning

        self.images = build_image_encoder({k: shapes[k] for k in image}, obs_horizon, width, cfg)
        self.state = StateEncoder({k: shapes[k] for k in vector}, obs_horizon, width) if vector else None
        self.task = TaskToken(num_tasks, width) if num_tasks > 0 else None
        self.vector_keys, self.image_keys, self.lang_key = vector, image, lang
        self.n_obs = (self.images.n_tokens if image else 0) + (obs_horizon if vector else 0) + (num_tasks > 0)
        max_pos = getattr(backbone.config, "max_position_embeddings", None)
        if max_pos is not None and self.n_obs + self.lang_len > max_pos:
            raise ValueError(f"{self.n_obs} observation + {self.lang_len} word tokens exceed the backbone's {max_pos} positions")
        self.p_drop = float(_opt(cfg, "lang_dropout", 0.1))
        if not 0 <= self.p_drop < 1:
            raise ValueError(f"lang_dropout must be in [0, 1), got {self.p_drop}")
        self.null_lang = nn.Parameter(torch.zeros(1, 1, width)) if lang else None
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.n_tokens = self.n_obs + (lang is not None)
        self.dim, self.width = dim, width

    def backbone_tokens(self, obs: dict[str, torch.Tensor], task_id: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's output tokens (B, n_obs + L, width) at [images ; state ; task ; words]."""
        tokens = []
        if self.images is not None:
            tokens.append(self.images({k: obs[k] for k in self.image_keys}))
        if self.state is not None:
            tokens.append(self.state({k: obs[k] for k in self.vector_keys}))
        if self.task is not None:
            tokens.append(self.task(task_id))
        x = torch.cat(tokens, dim=1)
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        if self.lang_key is not None:
            ids = self.word_ids(obs)
            words = self.backbone.get_input_embeddings()(ids).to(x.dtype)
            x, mask = torch.cat([x, words], dim=1), torch.cat([mask, (ids != 0).long()], dim=1)
        return self.backbone(inputs_embeds=x, attention_mask=mask).last_hidden_state

    def word_ids(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = obs.get(self.lang_key)
        if ids is None:
            raise ValueError(f"VLA policy needs obs[{self.lang_key!r}] (B, L) long token ids (tokenize_instructions)")
        ids = ids[:, -1] if ids.ndim == 3 else ids  # (B, To, L): the newest step's instruction
        if ids.is_floating_point() or ids.ndim != 2 or ids.shape[1] != self.lang_len:
            raise ValueError(f"obs[{self.lang_key!r}] must be (B, {self.lang_len}) integer token ids, got "
                             f"{tuple(ids.shape)} {ids.dtype}")
        return ids.long()

    def forward(self, obs: dict[str, torch.Tensor], task_id: torch.Tensor | None = None) -> torch.Tensor:
        if self.lang_key is None:
            return self.out(self.backbone_tokens(obs, task_id))
        ids = self.word_ids(obs)
        if self.training and self.p_drop > 0:  # classifier-free guidance: drop whole instructions
            keep = torch.rand(ids.shape[0], 1, device=ids.device) >= self.p_drop
            ids = torch.where(keep, ids, torch.zeros_like(ids))
        out = self.backbone_tokens(obs | {self.lang_key: ids}, task_id)
        valid = (ids != 0).unsqueeze(-1).to(out.dtype)
        pooled = (out[:, self.n_obs :] * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1.0)
        pooled = torch.where(valid.sum(1, keepdim=True) > 0, pooled, self.null_lang.to(out.dtype))
        return self.out(torch.cat([out[:, : self.n_obs], pooled], dim=1))


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---------------------------------------------------------------------------------------------- report
def build_report_policy(head: str, tuning: str, image_size: int = 64, backbone: str = "minilm", lang_len: int = 16,
                        denoiser: str = "unet1d"):
    """A VLA policy with one small_cnn camera, a 9-d state, token ids and default head/denoiser sizes."""

    from rtpolicy.config import EncoderConfig
    from rtpolicy.policies import load_all
    from rtpolicy.factory import build_policy, denoiser_config, policy_config

    load_all()
    enc = EncoderConfig(image_backbone="small_cnn", vla_backbone=backbone, vla_tuning=tuning, lang_tokens_len=lang_len)
    over = {"encoder": enc, "num_inference_steps": 1} if head == "truncated" else {"encoder": enc}
    pol = policy_config(head, over)
    den = denoiser_config(denoiser)
    shapes = {"rgb": [image_size, image_size, 3], "state": [9], TOKENS_KEY: [lang_len], "action": [7]}
    policy = build_policy(pol, den, shapes)
    g = torch.Generator().manual_seed(0)
    policy.normalizer.fit({"state": torch.randn(64, 9, generator=g), "action": torch.rand(64, 7, generator=g) * 2 - 1})
    return policy.eval()


def report(heads: Sequence[str] = ("truncated", "streaming"), tunings: Sequence[str] = TUNINGS, image_size: int = 64,
           backbone: str = "minilm", repeats: int = 20) -> list[dict[str, Any]]:
    """Parameter counts and batch-1 per-call latency (median of ``repeats`` after warm-up) per head and tuning."""
    import time

    ids = tokenize_instructions(["open the drawer"], backbone, 16)
    g = torch.Generator().manual_seed(0)
    rows = []
    for head in heads:
        for tuning in tunings:
            policy = build_report_policy(head, tuning, image_size, backbone)
            obs = {"rgb": torch.randint(0, 256, (1, policy.obs_horizon, image_size, image_size, 3), dtype=torch.uint8,
                                        generator=g),
                   "state": torch.randn(1, policy.obs_horizon, 9, generator=g), TOKENS_KEY: ids}
            policy.reset()
            policy.predict_chunk(obs)  # warm-up (the streaming head's warm start happens here)
            times, enc_times = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                policy.predict_chunk(obs)
                times.append(time.perf_counter() - t0)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    policy.encode(obs)
                    enc_times.append(time.perf_counter() - t0)
            total, trainable = count_parameters(policy)
            enc_total, _ = count_parameters(policy.encoder.backbone)
            rows.append({"head": head, "tuning": tuning, "total": total, "trainable": trainable, "backbone": enc_total,
                         "chunk_ms": 1e3 * sorted(times)[len(times) // 2],
                         "encode_ms": 1e3 * sorted(enc_times)[len(enc_times) // 2], "tokens": policy.encoder.n_tokens})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="print parameters and batch-1 latency per head/tuning")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.report:
        parser.print_help()
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = report(image_size=args.image_size, backbone=args.backbone, repeats=args.repeats)
    print(f"VLA policy: backbone={args.backbone}, 1 camera {args.image_size}x{args.image_size} small_cnn, state (9,), "
          f"16 token ids, unet1d denoiser (defaults), batch 1, {args.threads} CPU thread(s)")
    print(f"{'head':<10} {'tuning':<7} {'cond tok':>8} {'total params':>13} {'trainable':>11} {'trainable %':>11} "
          f"{'ms / call':>10} {'of it encoder':>13}")
    for r in rows:
        per = "chunk (1 step)" if r["head"] == "truncated" else "tick"
        print(f"{r['head']:<10} {r['tuning']:<7} {r['tokens']:>8} {r['total']:>13,} {r['trainable']:>11,} "
              f"{100 * r['trainable'] / r['total']:>10.1f}% {r['chunk_ms']:>10.1f} {r['encode_ms']:>13.1f}  per {per}")


if __name__ == "__main__":
    main()
