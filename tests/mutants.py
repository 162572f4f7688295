"""
Mutation testing by hand-picked bugs: does the test suite catch the bugs the README promises cannot happen?

    python tests/mutants.py --list                  # every mutant: name, file, the bug, the tests that should kill it
    python tests/mutants.py --check                 # fast: each mutant's original text still occurs exactly once
    python tests/mutants.py                         # the full round (minutes): plant each bug, run its tests
    python tests/mutants.py --only lr-warmup-off-by-one --only guard-loss-only --jobs 2

Each mutant is a small edit of one file: `original` (must occur exactly once in the file) becomes `replacement`.
For each mutant the script copies the working tree (tracked and untracked files that git does not ignore, so no
.venv, data/ or runs/) into a scratch folder, plants the bug there (the working tree itself is never touched),
runs the tests named for it with `python -m pytest -x -q -p no:cacheprovider -n 0`, and reports:

    killed     a named test failed: the suite catches this bug
    survived   every named test passed: the bug would go unnoticed (strengthen a test, or explain why the mutant
               is equivalent and drop it)
    MISSING    the original text is not in the file, or occurs more than once: code moved (retarget the mutant)
    timeout    the tests ran past --timeout
    error      pytest could not run the named tests (exit 3-5: a renamed test, a usage error)

Before the round the named tests run once on the unchanged copy: they must pass there, or "killed" means nothing.
Not part of the test suite (its name does not start with test_); tests/test_promises.py runs --check, so a refactor
that moves a mutant's code fails CI until this list is updated.
"""

import argparse
import concurrent.futures
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0"]
P = "tests/test_promises.py::"


@dataclass
class Mutant:
    name: str
    file: str          # relative to the repository root
    original: str      # exact text, must occur exactly once in the file
    replacement: str
    bug: str           # the bug in one line
    tests: tuple       # test files or node ids that must fail with the bug planted


MUTANTS = [
    # ---- the learning-rate schedule ----
    Mutant("lr-warmup-off-by-one", "base_trainer.py",
           'return cfg["lr"] * (step + 1) / cfg["warmup_steps"]',
           'return cfg["lr"] * step / cfg["warmup_steps"]',
           "warmup is one step late: step 0 trains with lr 0",
           (P + "test_logged_lr_of_every_step_is_build_nanogpts_schedule",)),
    Mutant("lr-cosine-to-zero", "base_trainer.py",
           'return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])',
           'return 0.5 * (1.0 + math.cos(math.pi * progress)) * cfg["lr"]',
           "the cosine decays to 0 instead of --min-lr",
           (P + "test_logged_lr_of_every_step_is_build_nanogpts_schedule",)),
    Mutant("lr-no-floor-after-max-steps", "base_trainer.py",
           'progress = min(1.0, (step - cfg["warmup_steps"]) / span)',
           'progress = (step - cfg["warmup_steps"]) / span',
           "past max_steps the cosine rises again instead of staying at min_lr",
           (P + "test_schedule_function_at_its_boundaries",)),
    Mutant("lr-logged-not-applied", "base_trainer.py",
           'group["lr"] = lr * group.get("lr_scale", 1.0)',
           'group["lr"] = cfg["lr"] * group.get("lr_scale", 1.0)',
           "the schedule is logged but the optimizer trains at the peak lr throughout",
           (P + "test_logged_lr_of_every_step_is_build_nanogpts_schedule",)),
    # ---- weight decay groups ----
    Mutant("decay-on-biases-and-norms", "optim.py",
           '{"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]',
           '{"params": [p for p in params if p.dim() < 2], "weight_decay": cfg["weight_decay"]}]',
           "weight decay is applied to biases, norm gains and CLAP's beta too",
           (P + "test_weight_decay_goes_to_matrices_and_embeddings_only",)),
    Mutant("decay-nowhere", "optim.py",
           '{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]}',
           '{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0}',
           "--weight-decay is ignored: matrices and embeddings are not decayed",
           (P + "test_weight_decay_goes_to_matrices_and_embeddings_only",)),
    Mutant("muon-decay-from-adamw", "optim.py",
           'weight_decay=cfg["muon_weight_decay"]',
           'weight_decay=cfg["weight_decay"]',
           "Muon's group decays with --weight-decay instead of --muon-weight-decay",
           (P + "test_weight_decay_goes_to_matrices_and_embeddings_only",)),
    Mutant("muon-takes-embeddings", "optim.py",
           "if isinstance(m, nn.Linear) and m.weight.requires_grad",
           "if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad",
           "Muon orthogonalises the token embedding (the tied head) too",
           (P + "test_weight_decay_goes_to_matrices_and_embeddings_only",)),
    Mutant("muon-qkv-split-lr-of-whole-matrix", "optim.py",
           'alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p_block.shape)',
           'alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape)',
           "--muon-qkv split steps q, k and v with the (3C, C) matrix's lr (sqrt(3) too large), not a (C, C) one's",
           ("tests/test_muon_qkv.py::test_split_is_three_separate_orthogonalisations_and_fused_is_one",)),
    # ---- the non-finite guard and clipping ----
    Mutant("guard-loss-only", "base_trainer.py",
           'return figures, grad_norm, math.isfinite(figures["loss"]) and finite_norm',
           'return figures, grad_norm, math.isfinite(figures["loss"])',
           "the non-finite guard checks only the loss: an inf gradient is applied",
           (P + "test_an_inf_gradient_with_a_finite_loss_is_not_applied",)),
    Mutant("guard-gradient-only", "base_trainer.py",
           'return figures, grad_norm, math.isfinite(figures["loss"]) and finite_norm',
           'return figures, grad_norm, finite_norm',
           "the non-finite guard checks only the gradient norm: a nan loss trains on",
           ("tests/test_run_safety.py::test_a_nonfinite_step_is_skipped_or_stops_the_run",)),
    Mutant("guard-after-the-step", "base_trainer.py",
           '        if not finite:\n'
           '            return self.nonfinite_step(figures["loss"], grad_norm)  # the update is not applied\n'
           '        self.optimizer.step()\n',
           '        self.optimizer.step()\n'
           '        if not finite:\n'
           '            return self.nonfinite_step(figures["loss"], grad_norm)  # the update is not applied\n',
           "the non-finite check runs after optimizer.step(): the bad update is already in the weights",
           (P + "test_an_inf_gradient_with_a_finite_loss_is_not_applied",)),
    Mutant("nonfinite-weights-saved", "base_trainer.py",
           "if not all_finite(self.model.parameters()):",
           "if False:",
           "a checkpoint may hold nan/inf weights",
           (P + "test_weights_that_became_nonfinite_are_never_saved",)),
    Mutant("clip-does-nothing", "base_trainer.py",
           'torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])',
           'torch.nn.utils.clip_grad_norm_(params, float("inf"))',
           "the gradient norm is measured but not clipped before the step",
           (P + "test_the_optimizer_steps_on_the_clipped_gradient",)),
    # ---- exact --resume ----
    Mutant("resume-forgets-rng", "base_trainer.py",
           'checkpoint.set_rng_state(ckpt["rng"])',
           'pass  # RNG not restored',
           "--resume does not restore the RNG: dropout and MNTP masks differ from the uninterrupted run",
           (P + "test_resume_with_dropout_is_bit_identical", P + "test_train_mntp_resume_is_bit_identical")),
    Mutant("resume-forgets-data-position", "base_trainer.py",
           'self.train_loader.load_state_dict(ckpt["loader_state"])',
           'pass  # data position not restored',
           "--resume starts the data from the beginning again",
           ("tests/test_train.py::test_kill_and_resume_reproduces_the_uninterrupted_run",)),
    Mutant("resume-forgets-optimizer", "base_trainer.py",
           'self.optimizer.load_state_dict(ckpt["optimizer_state"])',
           'pass  # optimizer state not restored',
           "--resume restarts AdamW's moments from zero",
           (P + "test_resume_with_dropout_is_bit_identical",)),
    Mutant("resume-restarts-schedule", "base_trainer.py",
           "lr = lr_at(self.step, cfg)",
           'lr = lr_at(self.step - (self.resume_ckpt or {}).get("step", 0), cfg)',
           "the LR schedule restarts (warmup again) at the resumed step",
           (P + "test_resume_with_dropout_is_bit_identical",)),
    Mutant("resume-keeps-rows-of-the-killed-run", "plumbing/run_folder.py",
           "os.truncate(metrics, metrics_kept)",
           "pass",
           "rows the killed process logged after its checkpoint stay in metrics.jsonl (twice after the resume)",
           (P + "test_resume_with_dropout_is_bit_identical",)),
    Mutant("resume-forgets-stage", "models/progressive_diverging.py",
           'self.set_stage(int(state.get("stage", 1)))',
           "pass  # stage not restored",
           "progressive_diverging's stage is not rebuilt from the checkpoint",
           ("tests/test_progressive_diverging.py::test_checkpoint_round_trip",)),
    Mutant("ctrl-c-saves-nothing", "base_trainer.py",
           "            if code:\n                self.save_checkpoint()\n",
           "            if code:\n                pass\n",
           "Ctrl-C exits without saving a checkpoint",
           ("tests/test_train.py::test_ctrl_c_saves_a_checkpoint_and_resume_continues",)),
    Mutant("resume-ignores-changed-data", "data_file_utils.py",
           "if recorded is not None and recorded != found:",
           "if False:",
           "--resume trains on, silently, when the data under the run changed",
           ("tests/test_data_runs.py::test_changed_data_under_a_run_is_refused_in_one_line",)),
    # ---- checkpoints and the run folder ----
    Mutant("checkpoint-written-in-place", "checkpoint.py",
           "run_folder.atomic_write(path, buffer.getvalue())",
           'open(path, "wb").write(buffer.getvalue())',
           "checkpoint.pt is overwritten in place: a failed write destroys the previous checkpoint",
           ("tests/test_run_safety.py::test_a_failed_checkpoint_write_is_one_line_and_never_blocks_resume",)),
    Mutant("atomic-write-leaves-tmp", "plumbing/run_folder.py",
           "        with contextlib.suppress(OSError):\n            os.unlink(tmp)\n",
           "        pass\n",
           "a failed atomic write leaves its temporary file behind",
           ("tests/test_run_safety.py::test_atomic_write_and_append_keep_old_content_on_failure",)),
    Mutant("lock-not-exclusive", "plumbing/run_folder.py",
           "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
           "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
           "the run-folder lock is shared: two processes write one run folder",
           ("tests/test_run_safety.py::test_the_lock_is_exclusive_and_released",)),
    Mutant("trainer-takes-no-lock", "base_trainer.py",
           'lock = run_folder.RunFolderLock(cfg["out_dir"]).acquire()',
           'lock = os.makedirs(cfg["out_dir"], exist_ok=True)  # the folder, but no lock',
           "the trainer writes its run folder without taking the lock",
           ("tests/test_run_safety.py::test_a_second_writer_is_refused_and_sighup_saves",)),
    Mutant("overwrite-deletes-before-checking", "plumbing/run_folder.py",
           "    leftover = leftover_run_files(folder)\n",
           "    if overwrite:\n"
           "        clear_run_files(folder)\n"
           "    leftover = leftover_run_files(folder)\n",
           "--overwrite deletes the old run before the flags, data and model were checked",
           ("tests/test_run_safety.py::test_overwrite_with_a_bad_option_leaves_the_old_run",)),
    Mutant("run-without-overwrite-clobbers", "plumbing/run_folder.py",
           'if "checkpoint.pt" in leftover and not overwrite:',
           "if False:",
           "a new run in a folder holding a checkpoint replaces it without --overwrite",
           ("tests/test_train.py::test_bad_inputs_get_one_line_and_touch_nothing",)),
    # ---- DDP and gradient accumulation ----
    Mutant("ddp-mask-drops-world-size", "base_trainer.py",
           "return [n * world_size / total.clamp(min=1.0) for n in counts]",
           "return [n / total.clamp(min=1.0) for n in counts]",
           "with a loss mask under DDP each rank's loss lacks the world-size factor (loss and gradient halved)",
           (P + "test_two_processes_with_a_loss_mask_log_the_losses_of_one",)),
    Mutant("ddp-mask-local-token-count", "base_trainer.py",
           "dist.all_reduce(total)  # SUM",
           "pass  # SUM",
           "with a loss mask under DDP each rank divides by its own scored tokens, not the step's",
           (P + "test_two_processes_with_a_loss_mask_log_the_losses_of_one",)),
    Mutant("ddp-ranks-read-the-same-chunk", "dataloader.py",
           "chunk = self.chunk + self.rank",
           "chunk = self.chunk",
           "every DDP rank reads the same batch",
           ("tests/test_data_loader.py::test_ddp_ranks_read_what_one_process_reads",)),
    Mutant("ddp-metrics-summed-not-averaged", "base_trainer.py",
           "        t /= dist.get_world_size()\n",
           "        pass\n",
           "on gloo the ranks' logged losses are summed, not averaged",
           ("tests/test_train.py::test_two_processes_match_one",)),
    Mutant("grad-accum-not-averaged", "base_trainer.py",
           "[1.0 / self.grad_accum] * self.grad_accum",
           "[1.0] * self.grad_accum",
           "gradient accumulation sums the micro-batch losses instead of averaging them",
           ("tests/test_train.py::test_two_processes_match_one",)),
    Mutant("grad-accum-mean-of-masked-means", "base_trainer.py",
           "counts = [scored_tokens(y, loss_mask) for _, y, loss_mask, _ in batches]",
           "counts = [scored_tokens(y) for _, y, loss_mask, _ in batches]",
           "with --loss-on answer the step averages micro-batch means instead of every scored token",
           ("tests/test_answer_loss.py::test_accumulated_answer_gradient_is_the_token_mean_of_the_whole_step",)),
    # ---- what is scored ----
    Mutant("answer-mask-of-inputs", "dataloader.py",
           "mask = m[self.offset:]",
           "mask = m[:n]",
           "the answer mask is aligned with the inputs x instead of the targets y",
           ("tests/test_answer_loss.py::test_answer_only_loss_equals_a_hand_masked_cross_entropy",)),
    Mutant("answer-end-not-scored", "dataloader.py",
           "mask = np.where((buf[self.offset:] == self.eot_token) & (before > 0), np.float32(1.0), mask)",
           "mask = mask",
           "the <|endoftext|> that ends an answer is not scored: the model never learns to stop",
           ("tests/test_answer_loss.py::test_answer_only_loss_equals_a_hand_masked_cross_entropy",)),
    Mutant("loss-mask-ignored-by-chunked-loss", "auto_regressive_model.py",
           "weights = weights * loss_mask.reshape(-1).float()",
           "weights = weights",
           "the chunked head loss scores every token whatever the loss mask says",
           ("tests/test_answer_loss.py::test_answer_only_loss_equals_a_hand_masked_cross_entropy",)),
    Mutant("chunked-grad-h-drops-onehot", "auto_regressive_model.py",
           "grad_h = (p @ wd).float() - wt * wd[target_rows].float()",
           "grad_h = (p @ wd).float()",
           "the chunked head's gradient of the hidden states forgets the -onehot(target) term",
           ("tests/test_loss_paths.py::test_training_loss_equals_the_plain_loss_in_value_and_gradient",)),
    Mutant("chunked-grad-w-drops-onehot", "auto_regressive_model.py",
           "grad_w = (p.t() @ hc).float().index_add_(0, target_rows, -(wt * hc.float()))",
           "grad_w = (p.t() @ hc).float()",
           "the chunked head's gradient of the embedding forgets the -onehot(target) term",
           ("tests/test_loss_paths.py::test_training_loss_equals_the_plain_loss_in_value_and_gradient",)),
    Mutant("plain-loss-counts-ignored-targets", "auto_regressive_model.py",
           "weights = loss_mask.reshape(-1).to(losses.dtype) * (flat_targets != -1)",
           "weights = loss_mask.reshape(-1).to(losses.dtype)",
           "with a loss mask, masked_cross_entropy averages over -1 (ignored) targets too: forward's loss and "
           "the training loss differ",
           ("tests/test_loss_paths.py::test_lm_loss_with_ignored_targets_equals_the_plain_loss",)),
    Mutant("eval-mean-of-batch-means", "base_trainer.py",
           "sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * n",
           "sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * n / n.clamp(min=1.0)",
           "val rows average the batch means instead of the scored tokens",
           ("tests/test_answer_loss.py::test_answer_only_evaluation_is_a_token_mean_not_a_mean_of_batch_means",)),
    Mutant("bpb-ratio-inverted", "base_trainer.py",
           "* loader.tokens / max(1, loader.bytes)",
           "* loader.bytes / max(1, loader.tokens)",
           "bits per byte multiply by bytes per token instead of tokens per byte",
           (P + "test_bits_per_byte_from_the_val_tokens_and_bytes",)),
    Mutant("bpb-from-answer-loss", "base_trainer.py",
           'result["bpb"] = result.get("loss_all", result["loss"])',
           'result["bpb"] = result["loss"]',
           "with --loss-on answer bits per byte come from the answer-only loss",
           (P + "test_bits_per_byte_from_the_val_tokens_and_bytes",)),
    Mutant("dual-bw-mask-not-shifted", "models/dual_mask_gpt.py",
           "mask = None if loss_mask is None else torch.cat([loss_mask[:, :1], loss_mask[:, :-1]], dim=1)",
           "mask = loss_mask",
           "dual_mask_gpt's bw loss mask is not shifted with its targets",
           (P + "test_dual_mask_bw_loss_mask_is_shifted_with_its_targets",)),
    Mutant("mntp-predicts-in-place", "train_mntp.py",
           "pred, targets, scored = logits[:, :-1], x[:, 1:], masked[:, 1:].float()",
           "pred, targets, scored = logits, x, masked.float()",
           "MNTP predicts masked token i at position i, not i - 1 (LLM2Vec's shift)",
           ("tests/test_mntp.py::test_masked_token_is_predicted_from_the_previous_position_only",)),
    # ---- leak-free models ----
    Mutant("causal-fast-path-not-causal", "components.py",
           "is_causal=q_start == 0 and T > 1",
           "is_causal=False",
           "plain causal attention attends to every position, future included",
           ("tests/test_models_contract.py::test_forward_is_leak_free",)),
    Mutant("causal-mask-sees-next", "components.py",
           "return k_pos <= q_pos",
           "return k_pos <= q_pos + 1",
           "the explicit causal mask (key masks, ALiBi, KV cache) lets position i see i + 1",
           ("tests/test_models_contract.py::test_leak_free_with_a_filler_key_mask",)),
    Mutant("anticausal-mask-sees-previous", "components.py",
           "return k_pos >= q_pos",
           "return k_pos >= q_pos - 1",
           "dual_mask_gpt's bw mask lets position i see i - 1 (its target)",
           ("tests/test_dual_mask_gpt.py::test_bw_is_leak_free",)),
    Mutant("filler-keys-attended", "components.py",
           "keep = key_mask[:, None, None, :] | diagonal",
           "keep = key_mask[:, None, None, :] | True",
           "the key mask is ignored: filler tokens are attended",
           ("tests/test_models_contract.py::test_masked_tokens_reach_no_other_position",)),
    Mutant("conv-shift-too-small", "models/conv_attention.py",
           "self.shift = factor - 1",
           "self.shift = factor - 2",
           "conv_attention's compressor shift is one short: a group reads one token ahead",
           ("tests/test_conv_attention.py::test_leak_free",)),
    Mutant("progressive-attends-bidirectionally", "models/progressive_diverging.py",
           "x = self.blocks[a // repeats](x, self.config.attention, cache",
           'x = self.blocks[a // repeats](x, "bidirectional", cache',
           "progressive_diverging's blocks attend both ways: every position sees the future",
           ("tests/test_progressive_diverging.py::test_leak_free_in_every_stage",)),
    Mutant("dual-bw-positions-not-mirrored", "models/dual_mask_gpt.py",
           "pos = pos.flip(0)",
           "pos = pos",
           "dual_mask_gpt's bw positions are not counted from BW: bw is no mirror image of fw",
           ("tests/test_dual_mask_gpt.py::test_bw_is_the_mirror_of_fw",)),
    # ---- LoRA, progressive stages ----
    Mutant("lora-merge-without-scale", "components.py",
           "out.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A))",
           "out.weight.copy_(self.base.weight + self.lora_B @ self.lora_A)",
           "merging LoRA forgets alpha / r: the merged model computes something else",
           ("tests/test_progressive_diverging.py::test_merged_equals_unmerged",)),
    Mutant("lora-merge-drops-bias", "components.py",
           "out.bias.copy_(self.base.bias)",
           "out.bias.zero_()",
           "merging LoRA loses the layer's bias",
           # progressive's frozen attention biases are still 0 in its tests; a fine-tune's base run trained them
           ("tests/test_progressive_diverging.py::test_merged_equals_unmerged",
            "tests/test_answer_loss.py::test_lora_finetune_saves_a_plain_merged_model_and_resumes")),
    Mutant("progressive-copies-share-storage", "models/progressive_diverging.py",
           "origins.update(zip(block.parameters(), self.blocks[i // 2].parameters()))  # copy -> source\n",
           "origins.update(zip(block.parameters(), self.blocks[i // 2].parameters()))  # copy -> source\n"
           "            for p_new, p_old in zip(block.parameters(), self.blocks[i // 2].parameters()):\n"
           "                p_new.data = p_old.data\n",
           "progressive_diverging's copied blocks share storage with their source (siblings never diverge)",
           (P + "test_stage_copies_have_their_own_storage_and_train_apart",)),
    Mutant("progressive-optimizer-not-rebuilt", "base_trainer.py",
           'if self.model.on_train_step(self.step, cfg["max_steps"]):\n            self.build_optimizer()',
           'if self.model.on_train_step(self.step, cfg["max_steps"]):\n            pass',
           "the optimizer is not rebuilt at a stage switch: the new blocks never train (the seed's bug)",
           (P + "test_stage_copies_have_their_own_storage_and_train_apart",)),
    Mutant("progressive-copies-start-from-zero-moments", "optim.py",
           "elif origins.get(p) in source:",
           "elif False:",
           "a copied block's parameters start with empty Adam state instead of their source's",
           ("tests/test_progressive_diverging.py::test_copied_parameters_start_with_their_sources_adam_state",)),
    # ---- SimCSE (train_simcse.py, embed.pool) ----
    Mutant("simcse-no-temperature", "train_simcse.py",
           "scores = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / temperature",
           "scores = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T",
           "SimCSE's cosines are not divided by the temperature (scale 1 instead of 20)",
           ("tests/test_simcse.py::test_loss_is_sentence_transformers_multiple_negatives_ranking_loss",)),
    Mutant("pool-mean-counts-padding", "embed.py",
           'weights = m if pooling == "mean" else order',
           'weights = torch.ones_like(m) if pooling == "mean" else order',
           "mean pooling averages over the padding too: a text's embedding depends on its batch",
           ("tests/test_simcse.py::test_padding_never_enters_a_pooled_vector",)),
    Mutant("simcse-trains-on-val-texts", "train_simcse.py",
           'return TextBatches(self.dataset_dir, split, cfg["batch_size"]',
           'return TextBatches(self.dataset_dir, "val" if split == "train" else split, cfg["batch_size"]',
           "SimCSE's training texts come from the val split",
           ("tests/test_simcse.py::test_texts_come_from_the_train_split_only",)),
    Mutant("simcse-resume-restarts-the-texts", "train_simcse.py",
           'self.batch = int(state["batch"])',
           "self.batch = 0",
           "--resume starts SimCSE's texts from the first batch again",
           ("tests/test_simcse.py::test_resume_with_dropout_is_bit_identical",)),
    # ---- data, conversion, generation ----
    Mutant("split-by-wording", "synthetic_math.py",
           "return split_of_text(problem_key(question, final))",
           "return split_of_text(question)",
           "synthetic-math splits by wording: rewordings of a val/test problem are trained on",
           ("tests/test_data_synthetic.py",)),
    Mutant("hf-c-proj-not-transposed", "checkpoint.py",
           '"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight"',
           '"attn.c_attn.weight", "mlp.c_fc.weight"',
           "HF conversion forgets to transpose attn.c_proj (square, so no shape error)",
           ("tests/test_convert_hf.py::test_from_hf_gives_the_same_logits_loss_and_greedy_text",)),
    Mutant("kv-cache-positions-off-by-one", "components.py",
           "self.positions = (self.lengths[:, None] + offsets).clamp(min=0)",
           "self.positions = (self.lengths[:, None] + offsets + 1).clamp(min=0)",
           "the KV cache counts positions from 1: cached generation differs from uncached",
           ("tests/test_models_contract.py::test_greedy_generation_cached_equals_uncached",)),
    Mutant("kv-cache-forgets-the-past", "components.py",
           "return self.k[slot, :, :, :self.pos + T], self.v[slot, :, :, :self.pos + T]",
           "return k, v",
           "with the KV cache a new token attends only to itself",
           ("tests/test_models_contract.py::test_greedy_generation_cached_equals_uncached",)),
    Mutant("generate-window-slides-by-one", "auto_regressive_model.py",
           "starts[b] = len(rows[b]) - max(1, window // 2)",
           "starts[b] = len(rows[b]) - window",
           "generation's context slides by one token, not half a window (a cache refill per token)",
           ("tests/test_generate.py::test_the_window_slides_by_half_its_length",)),
    # ---- the model registry ----
    Mutant("model-name-not-from-registry", "models/__init__.py",
           "    module.Model.name = name\n",
           "",
           "a model subclassing baseline_gpt2's Model is named baseline_gpt2 (convert_hf.py exports it as GPT-2)",
           ("tests/test_models_contract.py::test_a_new_model_is_named_by_its_registry_key",)),
]


# ---- checking the list ------------------------------------------------------------------------

def problems(m, root=REPO):
    """What is wrong with mutant m against the tree at root: [] if it can be planted and its tests exist."""
    found = []
    path = root / m.file
    if not path.is_file():
        return [f"{m.file} does not exist"]
    count = path.read_text().count(m.original)
    if count != 1:
        found.append(f"its original text occurs {count} times in {m.file} (needs exactly 1)")
    for test in m.tests:
        file, _, node = test.partition("::")
        if not (root / file).is_file():
            found.append(f"test file {file} does not exist")
        elif node and f"def {node.split('[')[0]}(" not in (root / file).read_text():
            found.append(f"{file} has no test {node}")
    return found


# ---- running ---------------------------------------------------------------------------------

def copy_tree(dest):
    """The working tree (tracked + untracked, not ignored) into dest/repo; dest/shared points at ../shared."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    repo = dest / "repo"
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    shared = REPO.parent / "shared"
    if shared.is_dir():  # the tests read ../shared (tiktoken cache, GSM8K)
        (dest / "shared").symlink_to(shared)
    return repo


def run_tests(repo, tests, timeout):
    """(status, seconds, output tail) of pytest on `tests` in the copy at repo."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no stale .pyc of a mutated file of the same size
    start = time.time()
    proc = subprocess.Popen([sys.executable, *PYTEST, *tests], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and the trainers it started
        out, _ = proc.communicate()
        return "timeout", time.time() - start, out[-3000:]
    status = {0: "passed", 1: "failed", 2: "failed"}.get(proc.returncode, "error")  # 2: a collection error
    return status, time.time() - start, out[-3000:]


def why_killed(out):
    """The first failing test and its first assertion line, from pytest -q output."""
    lines = out.splitlines()
    failed = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "?")
    error = next((line.strip() for line in lines if line.startswith("E ")), "")
    return f"{failed[:160]} | {error[:160]}"


def run_mutant(m, repo, timeout):
    path = repo / m.file
    text = path.read_text()
    if text.count(m.original) != 1:
        return "MISSING", 0.0, f"original text occurs {text.count(m.original)} times in {m.file}"
    path.write_text(text.replace(m.original, m.replacement))
    try:
        status, seconds, out = run_tests(repo, m.tests, timeout)
    finally:
        path.write_text(text)
    return {"failed": "killed", "passed": "survived"}.get(status, status), seconds, out


def main(argv=None):
    p = argparse.ArgumentParser(description="Plant each listed bug in a copy of the tree and run the tests that "
                                            "should catch it.")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true", help="only check that every mutant's text occurs exactly once")
    p.add_argument("--only", action="append", metavar="NAME", help="run this mutant (repeatable; a prefix works)")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="mutants run at once (default 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default 600)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the named tests on the unchanged copy")
    p.add_argument("--verbose", action="store_true", help="show pytest's output for survivors and errors")
    args = p.parse_args(argv)

    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "two mutants share a name"
    chosen = MUTANTS
    if args.only:
        chosen = [m for m in MUTANTS if any(m.name.startswith(o) for o in args.only)]
        if not chosen:
            p.error(f"no mutant matches {args.only}; see --list")

    if args.list:
        for m in chosen:
            print(f"{m.name:42s} {m.file:32s} {m.bug}\n{'':42s} -> {' '.join(m.tests)}")
        print(f"{len(chosen)} mutants")
        return 0

    if args.check:
        bad = [(m, problems(m)) for m in chosen]
        bad = [(m, found) for m, found in bad if found]
        for m, found in bad:
            for f in found:
                print(f"MISSING {m.name}: {f}")
        print(f"{len(chosen) - len(bad)} of {len(chosen)} mutants can be planted")
        return 1 if bad else 0

    scratch = Path(tempfile.mkdtemp(prefix="lmsmall-mutants-"))
    try:
        copies = queue.Queue()
        for i in range(args.jobs):
            copies.put(copy_tree(scratch / f"copy{i}"))
        print(f"{len(chosen)} mutants, {args.jobs} at a time, copies of the tree in {scratch}", flush=True)

        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
            repo = copies.get()
            status, seconds, out = run_tests(repo, tests, args.timeout * 2)
            copies.put(repo)
            print(f"baseline: the {len(tests)} named tests {status} on the unchanged tree ({seconds:.0f} s)",
                  flush=True)
            if status != "passed":
                print(out)
                print("the named tests must pass on the unchanged tree first; fix that (or --no-baseline)")
                return 1

        def job(m):
            repo = copies.get()
            try:
                return m, run_mutant(m, repo, args.timeout)
            finally:
                copies.put(repo)

        results = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for m, (status, seconds, out) in pool.map(job, chosen):
                results.append((m, status))
                print(f"{status:9s} {m.name:42s} {seconds:5.0f} s  {m.bug}", flush=True)
                if status == "killed":  # by which test, and how: check that it is for the right reason
                    print(f"{'':10s}{why_killed(out)}", flush=True)
                elif args.verbose:
                    print("    " + out.replace("\n", "\n    "))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    counts = {s: sum(1 for _, st in results if st == s) for s in ("killed", "survived", "MISSING", "timeout", "error")}
    ran = len(results) - counts["MISSING"]
    rate = counts["killed"] / ran if ran else 0.0
    print(" | ".join(f"{k} {v}" for k, v in counts.items()) + f" | kill rate {rate:.0%} ({counts['killed']} of {ran} "
          f"planted; MISSING ones are not counted)")
    for m, status in results:
        if status != "killed":
            print(f"  {status}: {m.name} ({m.file}): {m.bug}")
    return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
