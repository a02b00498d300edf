"""Hydra structured configs: every option is a dataclass in the ConfigStore, so unknown keys and
wrong types fail at launch. YAML under ``rtpolicy/conf/`` only picks among them and sets values.

Groups: ``task=`` (rtpolicy/conf/task/*.yaml on the ``metaworld`` schema), ``policy=`` and ``denoiser=``
(one registered dataclass per head / denoiser, see the registries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TaskConfig:
    """A demonstration source + evaluation environment."""

    env: str = "metaworld"  # environment family (rtpolicy.envs registry)
    name: str = MISSING  # e.g. pick-place-v3
    # the demonstration store; when it is missing, demos are collected into it only if it is this default
    # path (DEFAULT_DATASET) or task.collect=true, so a mistyped path fails instead of collecting there
    dataset: str = "data/${task.env}/${task.name}.zarr"
    collect: bool = False  # collect demos into a missing task.dataset that is not the default path
    # bring your own data (rtpolicy.datasets.formats): dataset may be a zarr store, a LeRobot v3 folder, a robomimic
    # .hdf5 or a rosbag2 bag; "" detects the format (zarr | lerobot | robomimic | rosbag)
    dataset_format: str = ""
    # mappings or None; typed Any so that `task.dataset_keys={state: observation.state}` works on the command line
    dataset_keys: Any = None  # our key -> source key or list of keys (concatenated); None: the format's defaults
    dataset_options: Any = None  # reader options, e.g. a bag's sources, rate, max_age, split
    dataset_cache: str = "data/cache"  # non-zarr datasets are converted once into a zarr store in this folder
    demos: int = 50  # episodes to collect when the dataset is missing
    demo_seed: int = 0
    action_noise: float = 0.0  # Gaussian std added to expert actions while collecting (times the env's action_noise_scale)
    # collected single-task demos go on for this many expert steps after their first success (envs with
    # resume_after_success), so the states at and past the goal are training inputs; 0: end at the success
    post_success_steps: int = 0
    # observation keys the policy reads: "state" (39,), "rgb_<camera>" (image_size, image_size, 3) uint8 frames
    # rendered from a MuJoCo camera (e.g. rgb_corner, rgb_topview), "lang_emb" (384,) instruction embeddings
    obs_keys: list[str] = field(default_factory=lambda: ["state"])
    image_size: int = 84  # height = width of the rgb_<camera> frames
    action_key: str = "action"
    max_episode_steps: int = 200
    num_tasks: int = 0  # >0: multi-task, dataset has data/task_id, the policy gets a task embedding
    tasks: list[str] = field(default_factory=list)  # a suite (e.g. MT10): member tasks; task_id = index, num_tasks = len
    task_id: int = 0  # this task's index among num_tasks (set per member when a suite is evaluated)
    chain_length: int = 0  # >0: a suite is evaluated on chains of this many subtasks (env task chain<N>, CALVIN protocol)
    condition_on_task_id: bool = True  # False: a suite's policy gets no task token (e.g. conditioned on lang_emb instead)
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # extra env constructor arguments, e.g. {scene: B}


class Choice(str, Enum):
    """A config choice: OmegaConf rejects any other value at compose time, and a member compares (and
    hashes) equal to its string, so ``cfg.sampler == "ddim"`` and dict lookups by name keep working."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:
        return hash(self.value)


class Normalization(Choice):
    minmax = "minmax"
    meanstd = "meanstd"


class BetaSchedule(Choice):
    linear = "linear"
    scaled_linear = "scaled_linear"
    squaredcos_cap_v2 = "squaredcos_cap_v2"


class PredictionType(Choice):
    epsilon = "epsilon"
    sample = "sample"


class VLATuning(Choice):
    frozen = "frozen"  # projections only
    lora = "lora"  # adapters on attention query/value
    full = "full"


DEFAULT_DATASET = "data/{env}/{name}.zarr"


def default_dataset(task_cfg) -> str:
    """The store a task collects into without being asked: data/<env>/<name>.zarr."""
    return DEFAULT_DATASET.format(env=task_cfg.env, name=task_cfg.name)


@dataclass
class EncoderConfig:
    """How a head turns observations into condition tokens (rtpolicy.policies.encoders.observation).

    Vector keys (D,) -> one state token per obs step; image keys (H, W, 3) -> one token per camera per
    obs step; the ``lang_key`` (E,) -> one language token; ``slot_key`` -> ``slot_queries`` attended object
    tokens. State-only policies without slots ignore every field here.
    With ``vla_backbone`` set, the VLA encoder reads images, vectors and ``lang_tokens`` (L,) token ids.
    """

    image_backbone: str = "resnet18"  # resnet18 (GroupNorm, no pretrained weights) | small_cnn (fast)
    shared_backbone: bool = True  # one backbone for every camera; False: one per camera
    num_keypoints: int = 32  # spatial-softmax keypoints per camera (2 coordinates each)
    crop_fraction: float = 0.9  # side of the crop / side of the frame: random crop in train(), centre crop in eval()
    color_jitter: float = 0.0  # train-time brightness/contrast/saturation jitter strength; 0: off
    # a pretrained image encoder: the safetensors file of an rtpolicy checkpoint (its image encoder) or of
    # an image encoder's own state dict; '': random init
    image_weights: str = ""
    # True: the backbone and keypoints are not trained (centre crop, no augmentation), so training encodes
    # every stored frame once and reads those cached keypoints instead of decoding frames
    freeze_image: bool = False
    lang_key: str = "lang_emb"  # obs key of precomputed sentence embeddings (rtpolicy.policies.encoders.language)
    lang_dropout: float = 0.1  # train-time probability of replacing the language token by a learned null token
    lang_norm: bool = False  # a LayerNorm ends the sentence-embedding token's projection (unit scale from the start)
    # object slots (rtpolicy.policies.encoders.slots): the last slot_count * slot_size dims of the vector key
    # slot_key are slot_count objects of slot_size features each; queries made from the task / language tokens
    # attend over them, adding slot_queries condition tokens ('': off)
    slot_key: str = ""
    slot_count: int = 0
    slot_size: int = 0
    slot_queries: int = 2
    # VLA (rtpolicy.policies.encoders.vla): a pretrained transformer reads image, state and instruction tokens
    vla_backbone: str = ""  # '': off (the encoders above); 'minilm': packaged all-MiniLM-L6-v2; or a local HF folder
    vla_tuning: VLATuning = VLATuning.lora  # frozen (projections only) | lora (adapters on attention query/value) | full
    lora_rank: int = 8  # rank of each LoRA adapter (vla_tuning=lora)
    lang_tokens_len: int = 16  # token ids per instruction in obs["lang_tokens"] (tokenize_instructions max_len)


@dataclass
class HeadConfig:
    """What every policy head's config has: its registry name, the window horizons, the observation
    normalization, the condition width and the observation encoder. A head's config subclasses this and
    is registered (``POLICIES.register(name, config=...)``) and stored in Hydra's ConfigStore as written."""

    name: str = MISSING
    obs_horizon: int = 2  # To, observation steps per inference call
    horizon: int = 16  # H, actions predicted per denoising
    action_horizon: int = 8  # Ha, actions executed per chunk
    normalizer: Normalization = Normalization.minmax  # observations; actions are always min-max
    cond_dim: int = 64  # width of the observation tokens
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # policy.encoder.* on the command line


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    warmup_steps: int = 100
    grad_clip: float = 1.0


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"  # bfloat16 autocast of forward passes on a CUDA device; weights, gradients and optimizer stay fp32


class EvalBackend(Choice):
    local = "local"  # simulator subprocesses of this process (gymnasium AsyncVectorEnv)
    ray = "ray"  # episodes, suite members and chains sharded over Ray workers (rtpolicy.evaluation.ray; extra `dist`)


@dataclass
class TrainLoopConfig:
    steps: int = 2000
    # the global batch: under torchrun it is split evenly over the processes (and over grad_accum micro-batches)
    batch_size: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step; each holds batch_size / (processes * grad_accum) windows
    precision: Precision = Precision.fp32  # bf16: autocast on CUDA (refused on CPU)
    dist_timeout_s: int = 1800  # under torchrun: how long ranks wait for each other (e.g. for rank 0's evaluation)
    val_fraction: float = 0.05  # share of episodes held out for validation loss
    val_every: int = 500
    eval_every: int = 0  # 0: rollout evaluation only at the end
    ckpt_every: int = 1000
    ema_decay: float = 0.995
    log_every: int = 50
    num_workers: int = 0
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class EvalConfig:
    episodes: int = 30
    num_envs: int = 4  # parallel simulator processes (gymnasium AsyncVectorEnv)
    seed: int = 100_000  # evaluation seeds never overlap demo seeds
    max_episode_steps: Optional[int] = None  # None: task.max_episode_steps
    video: int = 0  # number of episodes to save as mp4
    latency_reps: int = 30  # batch-1 predict_chunk timings for chunk_ms_p50/p95
    runtime: str = "torch"  # torch (eager) | ort: the chunk as ONNX graphs in ONNX Runtime (the ort extra); what runs the
    # policy, while `backend` below picks where the episodes run (local | ray), so issue 19's eval.backend=ort is runtime=ort
    ort_threads: int = 1  # ONNX Runtime intra-op threads (runtime=ort)
    out: Optional[str] = None  # results JSON path
    backend: EvalBackend = EvalBackend.local  # ray: shard episodes over Ray workers, same per-episode results
    ray_address: Optional[str] = None  # backend=ray: an existing cluster (e.g. "auto", "HOST:6379"); None: start Ray here
    ray_workers: int = 0  # backend=ray: Ray actors, each loads the policy once; 0: one per num_envs CPUs of the cluster
    ray_gpus: float = 0.0  # backend=ray: GPUs per actor (e.g. 0.25 lets four actors share one GPU); 0: CPU inference


@dataclass
class TrainConfig:
    task: TaskConfig = MISSING
    policy: Any = MISSING
    denoiser: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto | cpu | cuda
    run_dir: Optional[str] = None  # None: runs/<task>/<policy>-<denoiser>/<timestamp>, or the newest one with resume
    resume: bool = False


@dataclass
class EvalMainConfig:
    checkpoint: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    policy: dict[str, Any] = field(default_factory=dict)  # inference-time overrides, e.g. +policy.num_inference_steps=4



def register_configs() -> ConfigStore:
    """Put every schema and every registered policy/denoiser config into Hydra's ConfigStore."""
    from rtpolicy.policies import load_all  # registers heads, denoisers
    from rtpolicy.policies.base import POLICIES
    from rtpolicy.policies.denoisers.base import DENOISERS

    load_all()
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalMainConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    for name, entry in POLICIES.items():
        cs.store(group="policy", name=name, node=entry.config)
    for name, entry in DENOISERS.items():
        cs.store(group="denoiser", name=name, node=entry.config)
    return cs
