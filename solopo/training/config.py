"""`train.*` settings: the training loop's own config type, read by the train stage and by the launched ranks.

It lives beside the loop (not in solopo.stages) so that training imports nothing from the stages above it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from solopo.pipeline.config import StageConfig, parse_length


class LoraSettings(StageConfig):
    """`train.lora.*`: the LoRA adapter (PEFT LoraConfig) used with train.peft=lora|qlora."""

    r: int = Field(default=16, gt=0, description="adapter rank")
    alpha: float = Field(default=32.0, gt=0, description="scaling numerator: the update is (alpha / r) * B A")
    dropout: float = Field(
        default=0.0, ge=0, lt=1, description="dropout on the adapter input (> 0 needs train.disable_dropout=false)"
    )
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="module names to adapt, or 'all-linear': every linear layer of the decoder (not the LM head)",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v != "all-linear":
            v = [x.strip() for x in v.split(",") if x.strip()]  # --set train.lora.target_modules=q_proj,v_proj
        if isinstance(v, list) and not v:
            raise ValueError("name at least one module (e.g. [q_proj, v_proj]) or use 'all-linear'")
        return v


class TrainConfig(StageConfig):
    algo: Literal["dpo", "simpo", "orpo"] = Field(default="orpo", description="preference loss L_PO")
    mode: Literal["solo", "long", "expand-long", "short"] = Field(
        default="solo",
        description="solo = SoLoPO; long = Long-PO; expand-long; short = alpha 0 (README: Training modes)",
    )
    alpha: float | None = Field(
        default=None, description="SoLo-RA weight; None = paper default (DPO 3, SimPO 1, ORPO 1)"
    )
    beta: float | None = Field(default=None, description="None = DPO 0.1 (TRL), SimPO 2.0 (SimPO paper)")
    gamma: float = Field(default=0.5, description="SimPO target reward margin")
    orpo_lambda: float = Field(default=0.1, description="ORPO odds-ratio weight (ORPO paper; TRL's ORPOConfig.beta)")
    orpo_nll: Literal["completion", "sequence"] = Field(
        default="completion",
        description="ORPO NLL over the chosen completion (paper) or the whole prompt+completion (TRL's ORPOTrainer); "
        "either way averaged per token within each example, then over the batch's examples, where TRL averages over "
        "all tokens of the batch at once (equal at micro_batch_size 1 or equal lengths)",
    )
    ra_ref: Literal["long", "short"] = Field(
        default="long", description="DPO long reward reference: pi_ref(y_w|x_long) precomputed, or reuse the short one"
    )
    target_len: int | None = Field(
        default=None, description="which long length of the data to train on; None = largest"
    )
    lr: float = Field(default=5e-7, gt=0, description="peak learning rate (HF learning_rate)")
    weight_decay: float = Field(default=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(default=0.1, description="fraction of the optimizer steps spent warming up")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="decay after warmup (HF lr_scheduler_type)"
    )
    max_grad_norm: float = Field(default=1.0, description="gradient clipping norm")
    epochs: float = Field(
        default=1.0, gt=0, description="passes over the pairs, fractional allowed (HF num_train_epochs)"
    )
    max_steps: int | None = Field(
        default=None, gt=0, description="stop after this many optimizer steps (overrides epochs)"
    )
    micro_batch_size: int = Field(
        default=1, gt=0, description="pairs per process per micro-step (HF per_device_train_batch_size)"
    )
    grad_accum: int = Field(
        default=8, gt=0, description="micro-steps per optimizer step (HF gradient_accumulation_steps)"
    )
    max_length: int | None = Field(default=None, description="drop examples with a longer sequence (tokens)")
    logps_chunk: int = Field(
        default=1024, gt=0, description="LM-head rows per chunk when computing completion log-probs"
    )
    gradient_checkpointing: bool = Field(default=True, description="recompute activations in backward (less memory)")
    shared_prefix: bool = Field(
        default=False,
        description="compute each pair's prompt once for chosen and rejected (one packed row, block-causal mask; "
        "sdpa/eager attention) instead of a padded batch of two full sequences",
    )
    deepspeed: Literal["auto", "zero3", "zero2", "none"] = Field(
        default="auto",
        description="auto: none on CPU and on one GPU when weights+grads+AdamW fit in half of it, else zero3",
    )
    sp_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=1,
        description="sequence parallelism: ranks that split each sequence (DeepSpeed Ulysses/ALST); the "
        "data-parallel degree is num_processes / sp_size. Must divide the attention heads. auto: the memory plan's "
        "smallest valid size that fits (needs a GPU or train.gpu_mem_gb; else 1), recorded in the manifest",
    )
    offload: Literal["none", "optimizer", "full"] = Field(
        default="none", description="DeepSpeed CPU offload: optimizer state, or parameters too (zero3)"
    )
    launcher: Literal["auto", "none", "accelerate", "deepspeed"] = Field(
        default="auto",
        description="auto: in-process for one rank, else deepspeed (DeepSpeed or hostfile) or accelerate",
    )
    num_processes: int | None = Field(default=None, description="processes per node; None = GPUs visible (1 on CPU)")
    hostfile: str | None = Field(
        default=None, description="DeepSpeed hostfile for several nodes (`host slots=N` lines)"
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        default="none",
        description="also log the metrics to TensorBoard (train/models/<algo>-<mode>.tensorboard) or W&B",
    )
    logging_steps: int = Field(default=1, gt=0, description="optimizer steps between trainer_state.json log rows")
    save_steps: int | None = Field(
        default=None,
        ge=0,
        description="checkpoint every N optimizer steps; None = every save_minutes of training; 0 = never",
    )
    save_minutes: float = Field(
        default=10.0, gt=0, description="with save_steps unset: checkpoint after each this many minutes of training"
    )
    save_total_limit: int = Field(
        default=2, ge=0, description="checkpoints kept (newest first; 0 = all); all are removed once the model is saved"
    )
    resume: bool = Field(default=True, description="continue from the latest checkpoint of the same config and data")
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto", description="attention kernel (HF attn_implementation)"
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="training dtype; auto = bf16 on GPU, fp32 on CPU"
    )
    save_dtype: Literal["auto", "fp32"] = Field(
        default="auto", description="dtype of the saved weights: auto = the training dtype (bf16 when trained in bf16)"
    )
    disable_dropout: bool = Field(
        default=True,
        description="zero every dropout in the policy (TRL's default): the DPO reference is computed without dropout",
    )
    seed: int | None = Field(default=None, description="None = run.seed")
    peft: Literal["none", "lora", "qlora"] = Field(
        default="none",
        description="none: full fine-tuning; lora: a LoRA adapter on the frozen base (PEFT); qlora: the same on a "
        "4-bit base (bitsandbytes, CUDA only). The DPO reference is the base with the adapter disabled",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="the LoRA adapter, with peft=lora|qlora")
    merge_adapter: bool = Field(
        default=True,
        description="with peft: also save the adapter merged into the base (what eval loads); false: adapter only",
    )
    skip_plan: bool = Field(
        default=False, description="launch even when the memory plan (solopo plan) says the run cannot fit"
    )
    gpu_mem_gb: float | None = Field(
        default=None,
        gt=0,
        description="GiB per GPU for the pre-launch memory plan; None = the GPU's own (on a CPU: no check)",
    )

    @field_validator("target_len", "max_length", mode="before")
    @classmethod
    def _length(cls, v: Any) -> Any:
        return None if v is None else parse_length(v)

    @property
    def sp_planned(self) -> int:
        """sp_size, with auto read as 1: what holds until the memory plan resolves auto (prelaunch_check)."""
        return self.sp_size if isinstance(self.sp_size, int) else 1

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        # (positivity is checked per field, so that it is reported together with every other field's problem)
        problems = []
        if self.offload != "none" and self.deepspeed == "none":
            problems.append("offload needs deepspeed=zero2 or zero3")
        if self.offload == "full" and self.deepspeed not in ("zero3", "auto"):
            problems.append("offload=full (parameters too) needs deepspeed=zero3")
        if self.shared_prefix and self.attn == "flash_attention_2":
            problems.append("shared_prefix needs a custom attention mask: attn=sdpa or eager (or auto)")
        sp = self.sp_planned  # auto keeps to 1 where these rule out more
        if sp > 1 and self.deepspeed == "none":
            problems.append("sp_size > 1 runs through DeepSpeed's Ulysses (ALST): deepspeed=zero2, zero3 or auto")
        if sp > 1 and self.attn == "eager":
            problems.append("sp_size > 1 needs attn=sdpa, flash_attention_2 or auto (ALST cannot use eager's 4-D mask)")
        if self.peft != "none" and self.lora.dropout > 0 and self.disable_dropout:
            problems.append(
                f"lora.dropout={self.lora.dropout:g} with disable_dropout=true: set train.disable_dropout=false to "
                "train with adapter dropout (the DPO step-1 loss is then not log 2), or lora.dropout=0"
            )
        if self.alpha is not None and self.alpha < 0:
            problems.append("alpha must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self
