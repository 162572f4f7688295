"""
BaseTrainer: everything about training that is not the model.

    python train_baseline_gpt2.py --preset tiny                    # one process (CPU, CUDA or MPS)
    torchrun --nproc_per_node=2 train_baseline_gpt2.py --preset tiny --micro-batch-size 4   # DDP: gloo on CPU
                                                                   # (NCCL on GPUs); 2 x 4 x 128 = 1024 tokens/step

Reading order: lr_at (the schedule), then BaseTrainer.train_loop (the loop, top to bottom, as nanoGPT's
`while True:`) and train_step (zero_grad, forward, backward, clip, step). Set-up, checkpoints and the run
folder follow; the small functions at the bottom (DDP, loss-mask weights, the non-finite guard) sit beside
the loop. What a learner may skip lives elsewhere: plumbing/ (argument checks, run-folder lock, speed, console
output) and checkpoint.py (the checkpoint's format, writing, reading and --resume checks).

One optimizer step consumes --total-batch-size tokens: micro-batches of --micro-batch-size x --seq-len,
accumulated over grad_accum = total / (micro * seq * world_size) micro-steps on each of world_size ranks.
Rank r reads the chunks that one process would read at micro-steps r, r + N, ... so the tokens per step,
and hence the losses, do not depend on N.

What is scored (seed 001, "masked causal language modeling"):
    --loss-on all       every next-token prediction counts (default)
    --loss-on answer    only the answer tokens of question/answer data (synthetic-math, GSM8K-style JSON) and
                        the <|endoftext|> that ends each answer (so the model still learns to stop); the loader's
                        loss mask. Val rows then hold the answer-only "loss" plus "loss_all" (every token) and
                        bpb from loss_all.
    --filler-token T    the token T (one token of the tokenizer, e.g. " blah" with gpt2) is filler: no position
                        attends to it (a key mask, ANDed with the causal mask in scaled_dot_product_attention)
                        and it is never a scored target.
finetune.py and train_mntp.py subclass BaseTrainer (start from a checkpoint, LoRA, another objective).

Step numbering: `step` counts completed optimizer steps. A val row with step s measures the model after s
steps; the train row with step s is the loss of the batch that update s+1 trains on (build-nanogpt's habit).
"""

import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import optim
from auto_regressive_model import AutoRegressiveModel, masked_mean, scored_tokens
from base_data_preparer import ensure_prepared, get_tokenizer
from checkpoint import CheckpointError, all_finite
from data_file_utils import DataError, check_run_data
from dataloader import TokenDataLoader
from models import ModelConfigError, model_config, model_module
from plumbing import cli, run_folder, speed, trainer_console
from plumbing.cli import EXIT_DIVERGED, EXIT_WRITE_FAILED
# The command line (trainer_config.py); build_parser, resolve_config and the presets are also used from here.
from plumbing.trainer_config import (COMMON_DEFAULTS, LOSS_ON, RESUME_MAY_CHANGE, TRAIN_PRESETS,  # noqa: F401
                                     TrainError, add_trainer_arguments, adopt_saved_config, build_parser,
                                     check_lr_schedule, check_out_dir, grad_accum_steps, resolve_config)


class Diverged(Exception):
    """The loss or gradient norm became non-finite (or weights about to be saved are): the run stops."""


class PeerFailed(Exception):
    """Raised on ranks other than 0 when rank 0 reported a failure all ranks share (nothing more to print)."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def lr_at(step, cfg):
    """The learning rate of optimizer step `step`: linear warmup, then cosine decay from lr to min_lr at
    max_steps, min_lr after (build-nanogpt's get_lr)."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    span = max(1, cfg["max_steps"] - cfg["warmup_steps"])
    progress = min(1.0, (step - cfg["warmup_steps"]) / span)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])


class TrainingStep(nn.Module):
    """Wraps the model so that DDP's forward (which arms gradient sync) runs the model's own training loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, loss_mask, step, key_mask=None):
        if key_mask is None:
            return self.model.training_loss(x, y, loss_mask, step)
        # Filler keys masked: only the default training_loss takes them (check_filler_support made sure).
        return self.model.training_loss(x, y, loss_mask, step, key_mask=key_mask)


class BaseTrainer:
    reports_bpb = True  # evaluation rows carry bits per byte (False where "loss" is no language-model loss)

    def entry_point(self):
        """The script that resumes this kind of run (subclasses: finetune.py, train_mntp.py)."""
        return f"train_{self.model_name}.py"

    def __init__(self, model_name, cfg, typed=None):
        self.model_name, self.cfg, self.typed = model_name, cfg, typed or {}
        self.speed_info, self.stop_signal, self.lock, self.ddp = {}, None, None, False
        try:
            self.start()
        except BaseException:
            self.close()  # release the run folder (and the process group) of a run refused at the start
            raise

    def start(self):
        """Everything before the first step: devices, the run folder, data, model, optimizer, --resume. Nothing
        in the run folder is written or deleted here: take_over_run_folder() does that after the first step."""
        cfg = self.cfg
        self.held_lines = []  # metrics rows kept in memory until the run takes over its folder
        self.ddp, self.rank, self.world_size, self.local_rank, self.device = start_processes(cfg["device"])
        self.device_type, self.master = self.device.split(":")[0], self.rank == 0
        # bf16 autocast on CUDA (no loss scaling needed); fp32 elsewhere.
        self.autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if self.device_type == "cuda"
                         else contextlib.nullcontext())
        self.ckpt_path = os.path.join(cfg["out_dir"], "checkpoint.pt")
        self.metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        self.lock = lock_run_folder(cfg, self.master, self.ddp, self.device)  # before the folder is read
        cfg["resume"], self.resume_ckpt, note = check_run_folder(cfg, self.model_name, self.entry_point())
        self.log(note)
        if self.resume_ckpt is not None:
            self.cfg = cfg = adopt_saved_config(self.resume_ckpt["config"], self.typed)
        else:
            check_lr_schedule(cfg, self.typed)
        self.log(trainer_console.set_cpu_threads(cfg, self.device_type, self.world_size))
        self.log(trainer_console.gpu_preset_note(cfg, self.device_type))  # before data and model take time
        cfg.update(speed.plan_micro_batch(cfg, self.typed, self.device_type, self.model_name))
        self.check_model_before_data()
        self.setup_data()
        checkpoint.seed_everything(cfg["seed"])  # before the model: --seed decides the initial weights
        self.setup_model()
        self.step, self.tokens_seen = 0, 0
        # --micro-batch-size auto: a probe step on CUDA (RNG and model untouched)
        chosen, info, note = speed.choose_micro_batch_for_device(
            cfg, self.model, self.make_step_module(), self.device, self.autocast, self.world_size, self.step)
        self.log(note)
        self.speed_info.update(info)
        if chosen != cfg["micro_batch_size"]:  # the same total batch in another split: a new loader
            cfg["micro_batch_size"] = chosen
            self.grad_accum = grad_accum_steps(cfg, self.world_size)
            self.train_loader = speed.Prefetcher(self.make_loader("train"))
        self.check_eval_splits()
        self.checkpoint_step = None  # the step of the last checkpoint written or resumed from
        self.nonfinite_skipped = 0   # optimizer steps skipped for a non-finite loss or gradient (--skip-nonfinite)
        self.finished = False  # the checkpoint holds the final evaluation (val and test at max_steps)
        if self.resume_ckpt is not None:
            self.restore(self.resume_ckpt)
            if self.step > cfg["max_steps"] and not self.finished:
                raise TrainError(f"the checkpoint is at step {self.step}, past --max-steps {cfg['max_steps']}, "
                                 f"and the run has no final evaluation yet; give --max-steps {self.step} to end it "
                                 f"there, or more to train further")
        # FLOPs per token for MFU, then torch.compile (CUDA default) with a warm-up step
        self.flops_per_token, self.peak_flops, self.cudagraphs, info, note = speed.setup_compile(
            cfg, self.model, self.make_step_module(), self.device, self.autocast, self.step, self.evaluation_losses)
        self.speed_info.update(info)
        self.log(note)

    def log(self, *args):
        if self.master and args != (None,):  # None: a helper had nothing to say
            with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) must not stop the final save
                print(*args, flush=True)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self):
        """Train to --max-steps (or a signal); returns the exit code. The run folder's lock is held until here."""
        try:
            return self.train_loop()
        finally:
            self.release_run_folder()

    def train_loop(self):
        cfg = self.cfg
        if self.step >= cfg["max_steps"] and self.finished:
            self.log(f"run already finished at step {self.step}; raise --max-steps to train further")
            return 0
        # An interrupted run resumed with --max-steps at its checkpoint's step: no step, just the final evaluation.
        self.log(f"{self.model_name}: {self.model.num_params():,} parameters | {self.world_size} process(es) on "
                 f"{self.device} | {batch_line(cfg, self.grad_accum, self.world_size)} | data {self.dataset_dir}")
        self.log(speed.describe_speed(self.speed_info))
        if cfg["resume"]:
            self.log(f"resuming at step {self.step} from {self.ckpt_path}")
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self.request_stop)
        dts, evaluated = [], (self.step if self.finished else None)  # a finished run has its val row at this step
        while self.step < cfg["max_steps"]:
            if self.step % cfg["eval_interval"] == 0 and evaluated != self.step:
                self.evaluate("val")
                evaluated = self.step
            row = self.train_step()
            self.take_over_run_folder()  # after the first step: nothing before it touched the folder
            if row is not None:  # None: a non-finite step was skipped (--skip-nonfinite), the step count stays
                dts.append(row["dt_ms"])
                eta = trainer_console.eta_seconds(dts, cfg["max_steps"] - self.step)
                self.log(step_line(row, eta))
                if len(dts) == 1:
                    self.log(trainer_console.gpu_preset_estimate(cfg, self.device_type, dts[0], eta))
                if self.step % cfg["checkpoint_interval"] == 0 and self.step < cfg["max_steps"]:
                    self.save_checkpoint()
            code = self.should_stop()
            if code:
                self.save_checkpoint()
                self.log(f"interrupted: checkpoint saved at step {self.step} in {self.ckpt_path}; "
                         f"continue with --resume")
                return code
        self.evaluate("val")
        self.evaluate("test")
        self.save_checkpoint(finished=True)
        out = shlex.quote(cfg["out_dir"])
        self.log(f"done: {self.step} steps; {self.ckpt_path}, {self.metrics_path}; "
                 f"plot: python plot_loss.py {out} --out {shlex.quote(os.path.join(cfg['out_dir'], 'loss.png'))}")
        return 0

    def train_step(self):
        """One optimizer step: zero_grad, forward + backward of grad_accum micro-batches, clip, step.
        Returns the train row, or None when a non-finite step was skipped (the weights untouched)."""
        cfg = self.cfg
        if self.model.on_train_step(self.step, cfg["max_steps"]):
            self.build_optimizer()
            self.log(f"step {self.step:5d} | trainable parameters changed: "
                     f"{self.model.num_params(trainable_only=True):,} now train; optimizer rebuilt")
        t0 = time.time()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: --muon-lr / --lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, metric_sums = 0.0, {}
        for (x, y, loss_mask, key_mask), weight, last in self.micro_batches():
            with gradient_sync(self.step_module, self.ddp, last):
                with self.autocast:
                    loss, metrics = self.step_module(x, y, loss_mask, self.step, key_mask)
                (loss * weight).backward()
            # No .item() here: a GPU sync per micro-step stalls the queue; metrics stay on the device too.
            loss_sum = loss_sum + loss.detach() * weight
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * weight
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])  # clip first, then step
        figures, grad_norm, finite = step_figures(loss_sum, metric_sums, grad_norm, self.ddp, self.device)
        if not finite:
            return self.nonfinite_step(figures["loss"], grad_norm)  # the update is not applied
        self.optimizer.step()
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tokens = cfg["total_batch_size"]
        self.tokens_seen += tokens
        row = {"step": self.step, "split": "train", **figures, "lr": lr, "grad_norm": grad_norm,
               "tokens": self.tokens_seen, "dt_ms": dt * 1000, "tok_per_s": tokens / dt,
               **speed.train_row_speed(self.flops_per_token, self.peak_flops, self.device, tokens / dt)}
        self.write_metrics(row)
        self.step += 1
        return row

    def micro_batches(self):
        """(batch, weight, last) for each micro-step. Without a loss mask each batch is read when its turn comes
        (the prefetcher's copy of the next overlaps the GPU's work on this one) and weighs 1 / grad_accum; with
        one, micro_weights needs every batch's scored tokens first."""
        masked = self.with_loss_mask or self.filler_id is not None
        batches = [self.next_batch(self.train_loader) for _ in range(self.grad_accum)] if masked else None
        weights = micro_weights(batches, self.ddp, self.world_size) if masked else \
            [1.0 / self.grad_accum] * self.grad_accum
        for micro_step, weight in enumerate(weights):
            batch = batches[micro_step] if masked else self.next_batch(self.train_loader)
            speed.begin_micro_step(self)
            yield batch, weight, micro_step == self.grad_accum - 1

    def nonfinite_step(self, loss, grad_norm):
        """A step whose loss or gradient norm is not finite: skip it (--skip-nonfinite N, at most N times per run;
        the batch is consumed, the step count stays) or stop with Diverged. The weights were not touched."""
        bad = f"the loss is {loss:g}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm:g}"
        skip = self.nonfinite_skipped < self.cfg["skip_nonfinite"]
        self.write_metrics({"step": self.step, "split": "nonfinite", "loss": None, "problem": bad,
                            "action": "skipped" if skip else "stopped", "tokens": self.tokens_seen})
        if not skip:
            if not self.master:  # rank 0 says why
                raise PeerFailed(EXIT_DIVERGED)
            raise Diverged(f"step {self.step}: {bad}; the update was not applied and the run stops here. "
                           f"Kept: {self.last_good_checkpoint()}. {what_to_try(self.cfg)}")
        self.nonfinite_skipped += 1
        self.tokens_seen += self.cfg["total_batch_size"]
        self.log(f"step {self.step:5d} | {bad}: step skipped ({self.nonfinite_skipped} of --skip-nonfinite "
                 f"{self.cfg['skip_nonfinite']})")
        return None

    def request_stop(self, signum, frame):
        """SIGINT (Ctrl-C), SIGTERM (kill, schedulers) and SIGHUP (closed terminal or ssh session): save a
        checkpoint after this step and exit with 128 + the signal's number."""
        if self.stop_signal is not None:  # a second signal stops at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.stop_signal = signum
        self.log(f"\nstopping ({signal.Signals(signum).name}): saving a checkpoint after this step (Ctrl-C again "
                 f"to quit without saving)")

    def should_stop(self):
        """0 to go on, else the exit code: 128 + the signal any rank received (the largest, if several)."""
        return largest_on_any_rank(128 + self.stop_signal if self.stop_signal is not None else 0, self.ddp, self.device)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split):
        self.model.eval()
        rows, batches = speed.eval_batches(self.cfg, self.world_size)  # the same tokens at any micro batch
        loader = self.make_loader(split, rows)
        sums = {}
        for _ in range(batches):
            x, y, loss_mask, key_mask = self.next_batch(loader)
            speed.begin_micro_step(self)
            with self.autocast:
                losses = self.evaluation_losses(x, y, loss_mask, key_mask)
            add_token_sums(sums, losses, y, loss_mask, self.filler_id)  # on the device: one sync per evaluation
        self.model.train()
        sums = all_reduce_mean(speed.to_floats(sums), self.ddp, self.device)  # ranks' means of sums and counts
        result = {k: sums[k] / max(1.0, sums[f"{k} tokens"]) for k in losses}
        # Bits per byte: tokenizer-independent, so byte-level and BPE runs compare.
        if self.reports_bpb:
            result["bpb"] = result.get("loss_all", result["loss"]) / math.log(2) * loader.tokens / max(1, loader.bytes)
        row = {"step": self.step, "split": split, **result, "tokens": self.tokens_seen}
        self.write_metrics(row)
        extras = " | ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "loss")
        self.log(f"step {self.step:5d} | {split} loss {result['loss']:.4f} | {extras}")
        return result

    def evaluation_losses(self, x, y, loss_mask, key_mask):
        """{"loss": ..., ...} of one batch. With a loss mask, "loss" is what training scores and "loss_all"
        the loss over every (non-filler) token, from which bits per byte are computed."""
        if type(self.model).evaluation_losses is not AutoRegressiveModel.evaluation_losses:
            out = dict(self.model.evaluation_losses(x, y, loss_mask))  # a model's own (e.g. per direction)
            if loss_mask is not None:
                out["loss_all"] = self.model.evaluation_losses(x, y, None)["loss"]
            return out
        losses, _ = self.model.lm_token_losses(x, y, key_mask=key_mask)  # one forward for both losses, chunked
        out = {"loss": masked_mean(losses, y, loss_mask)}
        if self.with_loss_mask:
            scored = None if self.filler_id is None else (y != self.filler_id).float()
            out["loss_all"] = masked_mean(losses, y, scored)
        return out

    # -- data, model, optimizer -------------------------------------------------------------------
    def setup_data(self):
        """Prepare the dataset (rank 0; the others wait, then find it ready), check it is the run's own data, and
        open the training loader."""
        cfg = self.cfg
        self.dataset_dir = prepare_data(cfg, self.master, self.ddp)
        cfg.update(check_run_data(self.dataset_dir, cfg))  # --resume: same data hash; records budget + hash
        self.grad_accum = grad_accum_steps(cfg, self.world_size)
        if cfg["loss_on"] not in LOSS_ON:
            raise TrainError(f"--loss-on must be one of {', '.join(LOSS_ON)}, not {cfg['loss_on']!r}")
        self.with_loss_mask = cfg["loss_on"] == "answer"
        self.filler_id = filler_token_id(cfg["tokenizer"], cfg["filler_token"]) if cfg["filler_token"] else None
        self.target_offset = self.planned_target_offset()
        self.train_loader = speed.Prefetcher(self.make_loader("train"))  # reads one batch ahead

    def planned_target_offset(self):
        """How far ahead the targets are: the model's config decides (conv_attention can predict 64 ahead)."""
        planned = model_config(self.model_name, self.cfg["preset"], **self.cfg["model_overrides"])
        return getattr(planned, "target_offset", 1)

    def make_loader(self, split, batch_size=None):
        return TokenDataLoader(self.dataset_dir, split, batch_size or self.cfg["micro_batch_size"],
                               self.cfg["seq_len"], self.rank, self.world_size, self.target_offset,
                               with_loss_mask=self.with_loss_mask, device=self.device, score_answer_end=True)

    def check_eval_splits(self):
        """val is read at every --eval-interval and test only at the end: a split too small for one evaluation
        batch must stop the run here, before any step (and before --overwrite clears the old run)."""
        rows, _ = speed.eval_batches(self.cfg, self.world_size)
        for split in ("val", "test"):
            self.make_loader(split, rows)  # DataError, one line, if the split cannot fill a batch

    def next_batch(self, loader):
        """(x, y, loss_mask or None, key_mask or None) of the loader's next batch."""
        return with_filler_masks(loader.next_batch(), self.filler_id)

    def planned_model_config(self, tokenizer_vocab):
        cfg, module = self.cfg, model_module(self.model_name)
        extra = getattr(module, "EXTRA_TOKENS", 0)
        vocab_size = -(-(tokenizer_vocab + extra) // 64) * 64  # round up: faster matmuls
        overrides = dict(cfg["model_overrides"], vocab_size=vocab_size, block_size=cfg["seq_len"])
        return model_config(self.model_name, cfg["preset"], **overrides)

    def check_model_before_data(self):
        """The model's own size checks and its memory need, on the meta device, before the data are prepared
        (which can take minutes and write files): a model that cannot be built stops here in one line."""
        planned = self.planned_model_config(get_tokenizer(self.cfg["tokenizer"]).n_vocab)
        check_model_fits(model_module(self.model_name).Model, planned, self.device, self.world_size)

    def setup_model(self):
        module = model_module(self.model_name)
        self.model_cfg = self.planned_model_config(self.train_loader.vocab_size)
        check_model_fits(module.Model, self.model_cfg, self.device, self.world_size)  # before taking memory
        self.model = module.Model(self.model_cfg).to(self.device)
        check_filler_support(self.model, self.filler_id, self.device)
        self.optimizer = None
        self.build_optimizer()

    def build_optimizer(self):
        """--optimizer (optim.py: AdamW, or Muon + AdamW) over exactly the trainable parameters.
        Called again when a model hook changes which parameters train: optimizer state carries over for
        parameters that stay, and a copied parameter starts from its source's (optim.carry_optimizer_state)."""
        new = optim.build_optimizer(self.model, self.cfg, fused=self.device_type == "cuda")
        if self.optimizer is not None:
            optim.carry_optimizer_state(self.optimizer, new, getattr(self.model, "parameter_origins", {}))
        self.optimizer = new
        self.step_module = self.make_step_module()
        if self.ddp:
            self.step_module = DDP(self.step_module, device_ids=[self.local_rank] if self.device_type == "cuda"
                                   else None)

    def make_step_module(self):
        """The module whose forward returns (loss, metrics) of one micro-batch (DDP wraps it)."""
        return TrainingStep(self.model)

    # -- checkpoints (the format and writing: checkpoint.py) --------------------------------------
    def save_checkpoint(self, finished=False):
        """Write checkpoint.pt atomically. Weights that are not finite are never saved (every rank checks its
        identical copy, so all stop together). finished: the final checkpoint, after the val and test
        evaluation at max_steps."""
        if not all_finite(self.model.parameters()):
            if not self.master:
                raise PeerFailed(EXIT_DIVERGED)
            raise Diverged(f"step {self.step}: the weights are not finite; not saving them over "
                           f"{self.last_good_checkpoint()}. {what_to_try(self.cfg)}")
        if not self.master:
            return
        self.take_over_run_folder()  # a checkpoint before the first step (a signal): the folder is the run's now
        metrics_offset = os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0
        ckpt = checkpoint.training_checkpoint(
            model_name=self.model_name, model_config=self.model_cfg, model_states=self.model_states(),
            model_extra_state=self.model.extra_state(), optimizer_state=self.optimizer.state_dict(),
            step=self.step, tokens_seen=self.tokens_seen, loader_state=self.train_loader.state_dict(),
            config=self.cfg, metrics_offset=metrics_offset, nonfinite_skipped=self.nonfinite_skipped,
            finished=finished)
        checkpoint.write_checkpoint(self.ckpt_path, ckpt)  # WriteError (one line) leaves the old checkpoint
        self.checkpoint_step = self.step

    def model_states(self):
        """The weights a checkpoint stores. "model_state" is what load_model() loads; a subclass that trains
        another structure (LoRA) adds "train_model_state", which --resume loads instead."""
        return {"model_state": self.model.state_dict()}

    def restore(self, ckpt):
        """--resume: weights, optimizer state, data position, RNG and counters from the run's checkpoint."""
        checkpoint.load_training_weights(self.model, ckpt, self.ckpt_path)
        self.optimizer = None
        self.build_optimizer()  # the stage may have changed the trainable set
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        checkpoint.check_finite_state(self.model, self.optimizer, self.ckpt_path, ckpt["step"])
        self.train_loader.load_state_dict(ckpt["loader_state"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.step, self.tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        self.checkpoint_step, self.nonfinite_skipped = ckpt["step"], ckpt.get("nonfinite_skipped", 0)
        self.metrics_kept = ckpt["metrics_offset"]  # take_over_run_folder drops the rows logged after it
        self.finished = checkpoint.is_finished(ckpt)

    def last_good_checkpoint(self):
        if self.held_lines is not None and not self.cfg["resume"]:
            return f"{self.cfg['out_dir']} as it was (this run wrote nothing there)"
        if self.checkpoint_step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint (step {self.checkpoint_step}, {self.ckpt_path})"

    # -- the run folder (its rules: plumbing/run_folder.py) ---------------------------------------
    def take_over_run_folder(self):
        """Make the run folder this run's, once: clear the old run, or drop the rows the interrupted process
        logged after its checkpoint (run_folder.take_over); then write config.json and the rows held back. Not at
        the start: what fails only when the model first runs (a crash, an out-of-memory kill, a non-finite first
        step) must leave the folder byte for byte as the command found it."""
        if self.held_lines is None:
            return
        if self.master:
            run_folder.take_over(self.cfg["out_dir"], self.metrics_kept if self.cfg["resume"] else None)
        lines, self.held_lines = self.held_lines, None
        self.write_config()
        for line in lines:
            run_folder.append_line(self.metrics_path, line)

    def write_metrics(self, row):
        if self.master:
            line = json.dumps({**row, **self.model.log_fields()}) + "\n"
            if self.held_lines is not None:  # the folder is not the run's yet (take_over_run_folder)
                self.held_lines.append(line)
            else:
                run_folder.append_line(self.metrics_path, line)

    def write_config(self):
        if not self.master:
            return
        resolved = dict(self.cfg, model_config=dataclasses.asdict(self.model_cfg), world_size=self.world_size,
                        grad_accum=self.grad_accum, dataset_dir=str(self.dataset_dir),
                        n_params=self.model.num_params(), device_used=self.device, **self.speed_info)
        run_folder.atomic_write(os.path.join(self.cfg["out_dir"], "config.json"),
                                json.dumps(resolved, indent=2).encode())

    def release_run_folder(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self, finished=False):
        """Release the run folder and leave the process group. finished: every rank got here the same way (the
        loop ended or all stopped on a signal), so a barrier is safe; it keeps a rank from leaving while rank 0
        still writes the last checkpoint. After an error on one rank only, a barrier could wait forever."""
        self.release_run_folder()
        if self.ddp and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


# ---- beside the loop: DDP, loss-mask weights, the non-finite guard --------------------------------

def gradient_sync(step_module, ddp, last):
    """DDP all-reduces the gradients during backward(); the micro-steps before the last skip it (no_sync), so
    a step has one all-reduce."""
    return step_module.no_sync() if ddp and not last else contextlib.nullcontext()


def micro_weights(batches, ddp, world_size):
    """The weight of each micro-batch's (mean) loss in the step, so that the gradient, and the logged loss, are
    the mean over every scored token of the optimizer step (all micro-steps, all ranks), as one large batch
    would give. Without a loss mask every micro-batch scores B x T tokens: 1 / grad_accum each. With one
    (--loss-on answer, --filler-token) micro-batches score different numbers of tokens, and an equal weight
    would count a token of a sparse micro-batch more (one with none would add a loss of 0). So micro-batch
    i weighs n_i / N, N the scored tokens of the whole step, times world_size (DDP averages the ranks'
    gradients); the ranks' mean of the logged figures is then the token mean too."""
    counts = [scored_tokens(y, loss_mask) for _, y, loss_mask, _ in batches]
    total = torch.stack(counts).sum()
    if ddp:
        dist.all_reduce(total)  # SUM: the scored tokens of the step on every rank
    return [n * world_size / total.clamp(min=1.0) for n in counts]


def step_figures(loss_sum, metric_sums, grad_norm, ddp, device):
    """(the step's figures as floats, the gradient norm, whether loss and gradient norm are finite). The step's
    one host sync, before the update: every number of the row in one copy. The figures are averaged over the
    ranks and the norm is of the all-reduced gradients, so every rank decides alike."""
    figures = speed.to_floats({"loss": loss_sum, **metric_sums, "grad_norm": grad_norm})
    grad_norm = figures.pop("grad_norm")
    figures = all_reduce_mean(dict(figures, grad_norm_finite=float(math.isfinite(grad_norm))), ddp, device)
    finite_norm = figures.pop("grad_norm_finite") == 1.0
    return figures, grad_norm, math.isfinite(figures["loss"]) and finite_norm


def all_reduce_mean(values, ddp, device):
    """Average a dict of floats over the ranks (identity with one process)."""
    if not ddp or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device)
    cuda = str(device).startswith("cuda")
    dist.all_reduce(t, op=dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM)
    if not cuda:  # gloo has no AVG
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def what_to_try(cfg):
    return (f"Try a lower --lr (now {cfg['lr']:g}) or --grad-clip (now {cfg['grad_clip']:g}) in a new run "
            f"(--overwrite or another --out-dir), or --skip-nonfinite N to skip rare bad batches")


def with_filler_masks(batch, filler_id):
    """(x, y, loss_mask or None, key_mask or None) of a loader's batch: the answer mask with --loss-on answer;
    with --filler-token, filler keys are masked (key_mask False) and filler targets are not scored."""
    x, y, *rest = batch
    loss_mask, key_mask = (rest[0] if rest else None), None
    if filler_id is not None:
        key_mask = x != filler_id
        scored = (y != filler_id).float()
        loss_mask = scored if loss_mask is None else loss_mask * scored
    return x, y, loss_mask, key_mask


def add_token_sums(sums, losses, y, loss_mask, filler_id):
    """Add one evaluation batch to sums: each figure times the tokens it scored, and those tokens. A figure is
    then a mean over tokens, not over batches (with a loss mask a batch may score few answer tokens, or none).
    "loss_all" scores every non-filler token, the rest what the loss mask scores."""
    scored = scored_tokens(y, loss_mask)
    scored_all = scored_tokens(y, None if filler_id is None else (y != filler_id).float())
    for k, v in losses.items():
        n = scored_all if k == "loss_all" else scored
        sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * n
        sums[f"{k} tokens"] = sums.get(f"{k} tokens", 0.0) + n


def largest_on_any_rank(value, ddp, device):
    """The largest of an int over the ranks (the value itself with one process)."""
    if not ddp:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def batch_line(cfg, grad_accum, world_size):
    return (f"{cfg['total_batch_size']:,} tokens/step = {cfg['micro_batch_size']} x {cfg['seq_len']} x "
            f"{grad_accum} accum x {world_size}")


def step_line(row, eta):
    """The console line of a train row."""
    return (f"step {row['step']:5d} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | norm {row['grad_norm']:.2f} | "
            f"{row['dt_ms']:.0f} ms | {row['tok_per_s']:,.0f} tok/s | "
            f"{'MFU {:.1%} | '.format(row['mfu']) if 'mfu' in row else ''}eta {eta // 60:.0f}m{eta % 60:02.0f}s")


# ---- beside the set-up: processes, the run folder, the model's size, filler tokens ---------------

def start_processes(device_flag):
    """(ddp, rank, world_size, local_rank, device) of this process. Under torchrun (RANK and WORLD_SIZE set) it
    joins the process group (NCCL on GPUs, gloo on CPU) and takes the GPU of its local rank; one process may
    name cuda:N."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    requested = cli.pick_device(device_flag)  # UsageError if this machine cannot use it
    cuda = requested.split(":")[0] == "cuda"
    device = f"cuda:{local_rank}" if cuda and (ddp or requested == "cuda") else requested
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return ddp, rank, world_size, local_rank, device


def prepare_data(cfg, master, ddp):
    """The prepared dataset's folder: rank 0 prepares it if needed, the others wait and then find it ready."""
    args = dict(data_dir=cfg["data_dir"], max_tokens=cfg["max_tokens"], seed=cfg["data_seed"],
                run_data_hash=cfg.get("data_hash"))
    if master:
        dataset_dir = ensure_prepared(cfg["data"], cfg["tokenizer"], **args)
    if ddp:
        dist.barrier()
    if not master:
        dataset_dir = ensure_prepared(cfg["data"], cfg["tokenizer"], quiet=True, **args)
    return dataset_dir


def lock_run_folder(cfg, master, ddp, device):
    """One writer per run folder: rank 0 takes a kernel-released lock (run_folder.RunFolderLock) and returns it;
    every rank learns whether it got it, so none waits for a partner that is leaving."""
    check_out_dir(cfg)
    lock, failure = None, None
    if master:
        try:
            lock = run_folder.RunFolderLock(cfg["out_dir"]).acquire()
        except (run_folder.RunFolderBusy, run_folder.WriteError) as e:
            failure = e
    failed_somewhere = all_reduce_mean({"failed": float(failure is not None)}, ddp, device)["failed"]
    if failed_somewhere > 0 and not master:
        raise PeerFailed(2)
    if failure is not None:
        raise failure
    return lock


def check_run_folder(cfg, model_name, entry_point):
    """What --out-dir holds for this command: (resume, the checkpoint to resume from or None, a note or None).
    Refuses to clobber a run (run_folder.check_new_run) or to resume what this command cannot (a checkpoint of
    another kind, metrics cut since). --resume auto resumes if there is a checkpoint. Reads only."""
    ckpt_path = os.path.join(cfg["out_dir"], "checkpoint.pt")
    has_ckpt, auto = os.path.exists(ckpt_path), cfg["resume"] == "auto"
    if not (has_ckpt if auto else cfg["resume"]):
        note = run_folder.check_new_run(cfg["out_dir"], cfg["overwrite"], auto, checkpoint.is_training_checkpoint)
        starting = f"--resume auto: no checkpoint in {cfg['out_dir']}; starting a new run" if auto else None
        return False, None, "\n".join(line for line in (starting, note) if line) or None
    if not has_ckpt:
        raise TrainError(f"nothing to resume: no checkpoint.pt in {cfg['out_dir']}; run without --resume to start "
                         f"a new run")
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    checkpoint.check_resumable(ckpt, ckpt_path, model_name, entry_point, cfg["out_dir"])
    problem = run_folder.metrics_problem(os.path.join(cfg["out_dir"], "metrics.jsonl"), ckpt["metrics_offset"])
    if problem:
        raise TrainError(problem)
    return True, ckpt, None


def check_model_fits(model_class, model_cfg, device, world_size):
    """Build the model on the meta device (shapes, no memory: the model's own size checks run) in the state
    that needs the most memory, and refuse it if its weights, gradients and AdamW moments (16 bytes per
    parameter) exceed this device's memory: one line now rather than an out-of-memory kill later."""
    with torch.device("meta"):
        model = model_class(model_cfg).memory_probe_model()
    n = sum(p.numel() for p in model.parameters())
    processes = world_size if str(device).split(":")[0] == "cpu" else 1  # CPU ranks share the machine's memory
    need, have = 16 * n * processes, device_memory(device)
    if have and need > have:
        sizes = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(model_cfg).items()
                          if k.startswith("n_") or k in ("block_size", "vocab_size"))
        raise TrainError(f"the model has {n:,} parameters: training it needs about {need / 2**30:,.1f} GiB (16 "
                         f"bytes per parameter{' x %d processes' % processes if processes > 1 else ''}), more "
                         f"than the {have / 2**30:,.1f} GiB of {device}; choose smaller sizes ({sizes})")


def device_memory(device):
    """Bytes of memory on `device` (a CUDA GPU's, else this machine's RAM), or None if unknown."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def filler_token_id(tokenizer_name, text):
    """The token id of --filler-token: the string must be exactly one token of the tokenizer."""
    ids = get_tokenizer(tokenizer_name).encode(text, allowed_special="all")
    if len(ids) != 1:
        raise TrainError(f"--filler-token {text!r} is {len(ids)} tokens with the {tokenizer_name} tokenizer; give "
                         f"a string that is exactly one token (e.g. ' blah' with gpt2, one character with bytes)")
    return ids[0]


def check_filler_support(model, filler_id, device):
    """--filler-token needs a model that takes a key mask and trains with the plain next-token loss."""
    if filler_id is None:
        return
    if type(model).training_loss is not AutoRegressiveModel.training_loss:
        raise TrainError(f"--filler-token is not supported by {model.name}: it has its own training loss")
    try:
        with torch.no_grad():
            probe = torch.zeros(1, 2, dtype=torch.long, device=device)
            model(probe, key_mask=torch.ones_like(probe, dtype=torch.bool))
    except (TypeError, ValueError) as e:
        raise TrainError(f"--filler-token is not supported by {model.name} ({str(e).splitlines()[0]})") from None


# ---- the entry point ------------------------------------------------------------------------------

def run(trainer_class, resolve, argv=None):
    """Build and train; bad input ends with one line on stderr and exit code 2. resolve(argv) returns
    (model_name, cfg, typed). Shared by train_<model>.py, finetune.py and train_mntp.py."""
    trainer, finished = None, False
    try:
        model_name, cfg, typed = resolve(argv)
        trainer = trainer_class(model_name, cfg, typed)
        code = trainer.train() or 0
        finished = True
    except (TrainError, DataError, CheckpointError, ModelConfigError, cli.UsageError,
            run_folder.RunFolderBusy, run_folder.RunFolderTaken) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except run_folder.WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_WRITE_FAILED
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_DIVERGED
    except PeerFailed as e:  # rank 0 printed the reason
        code = e.code
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        code = 130
    finally:
        if trainer is not None:
            trainer.close(finished)
    if dist.is_available() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # Under torchrun, end here. The gloo process group outlives destroy_process_group() (C++ keeps
        # references; its worker threads keep running), so a normal exit destroys it during interpreter and
        # static teardown, racing those threads: ~1 in 10 two-process runs aborted there with "terminate called
        # without an active exception" and torchrun reported FAILED. Every file of the run is already written
        # and closed (atomic_write, append_line), so only stdout and stderr need flushing.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


def main(model_name, argv=None):
    """Entry point of every train_<model>.py."""
    sys.exit(run(BaseTrainer, lambda a: (model_name, *resolve_config(model_name, a)), argv))
