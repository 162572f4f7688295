"""
Layer-cut evaluation of dual-mask GPT checkpoints (the seed's "remove the layers one by one from the back").

For a checkpoint with n blocks, evaluate the fw and bw validation loss, accuracy and perplexity with the first
k blocks kept, k = n, n-1, ..., 1 (ln_f and the tied head stay). The same validation batches are used for
every k. Results go to <run dir>/layer_cuts.json (or --out):

    {"checkpoint": ..., "n_layer": n, "num_params": ..., "split": "val", "batches": ..., "tokens": ...,
     "cuts": [{"layers": k, "loss_fw", "loss_bw", "acc_fw", "acc_bw", "ppl_fw", "ppl_bw"}, ...]}

    python dual_mask/layer_cuts.py runs/dual_mask_gpt                   # a run folder (its checkpoint.pt)
    python dual_mask/layer_cuts.py runs/sweep/*/ --batches 16 --skip-existing
    python dual_mask/layer_cuts.py path/to/checkpoint.pt --out cuts.json

The data come from the run's own config (data, tokenizer, data_dir, data seed, seq_len, loss mask); --data-dir
overrides the folder. By default the batches are the run's own validation batches, so at full depth loss_fw and
loss_bw are the run's final val loss_fw and loss_bw (tests/test_dual_mask_gpt.py, for a run with --seed 5).
Perplexity is exp(mean loss over all batches).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import argparse
import json
import math
import os
import sys

import torch

from plumbing import cli
from auto_regressive_model import scored_tokens
from checkpoint import CheckpointError, load_model, tokenizer_of
from data_file_utils import DataError, atomic_write_bytes, check_run_data

CUTS_FILE = "layer_cuts.json"
# What validation_batches reads of the run's settings (its config.json, also in the checkpoint).
RUN_SETTINGS = {"data": str, "tokenizer": str, "seq_len": int}


def checkpoint_path(path):
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def validation_batches(run_config, split="val", n_batches=None, batch_size=None, data_dir=None):
    """The first n_batches (default: the run's --eval-batches) (x, y, loss_mask-or-None) of the run's
    validation split, on the CPU: the batches the trainer evaluated (same data seed, loss mask and loader)."""
    import base_data_preparer
    from dataloader import TokenDataLoader
    data_dir = data_dir or run_config.get("data_dir", "data")
    # the same arguments as base_trainer.setup_data, so the run's own prepared shards are found: the data
    # seed (--data-seed), not --seed (the initial weights)
    dataset_dir = base_data_preparer.ensure_prepared(run_config["data"], run_config["tokenizer"],
                                                     data_dir=data_dir, max_tokens=run_config.get("max_tokens"),
                                                     seed=run_config.get("data_seed", 1337), quiet=True,
                                                     run_data_hash=run_config.get("data_hash"))
    check_run_data(dataset_dir, run_config)  # the data must not have changed since training
    seq_len = int(run_config.get("seq_len") or run_config.get("block_size"))
    batch_size = batch_size or int(run_config.get("base_micro_batch_size", run_config.get("micro_batch_size", 8)))
    n_batches = n_batches or int(run_config.get("eval_batches", 8))
    loader = TokenDataLoader(dataset_dir, split, batch_size, seq_len,
                             target_offset=int(run_config.get("target_offset", 1)),
                             with_loss_mask=run_config.get("loss_on") == "answer", score_answer_end=True)
    batches = []
    for _ in range(n_batches):
        b = loader.next_batch()
        x, y = b[0], b[1]
        batches.append((x, y, b[2] if len(b) > 2 else None))
    return batches


@torch.no_grad()
def evaluate_directions(model, batches, device="cpu"):
    """Mean fw/bw loss and accuracy over the batches' scored tokens (a batch weighs as many as it scores, as in
    the trainer's val rows: with a loss mask they differ), and ppl = exp(mean loss)."""
    totals, n = {}, 0.0
    for x, y, mask in batches:
        x, y = x.to(device), y.to(device)
        mask = None if mask is None else mask.to(device)
        out = model.evaluation_losses(x, y, mask)
        scored = float(scored_tokens(y, mask))
        for k in ("loss_fw", "loss_bw", "acc_fw", "acc_bw"):
            totals[k] = totals.get(k, 0.0) + float(out[k]) * scored
        n += scored
    res = {k: v / max(n, 1.0) for k, v in totals.items()}
    res["ppl_fw"] = math.exp(res["loss_fw"])
    res["ppl_bw"] = math.exp(res["loss_bw"])
    return res


def layer_cut_curve(model, batches, device="cpu", log=None):
    """Evaluate with all blocks, then remove them one by one from the back down to one block.
    Cuts the model in place (it ends with one block)."""
    rows = []
    for k in range(len(model.blocks), 0, -1):
        model.keep_first_blocks(k)
        row = {"layers": k, **evaluate_directions(model, batches, device)}
        rows.append(row)
        if log:
            log(f"  layers={k:3d}  loss_fw={row['loss_fw']:.4f}  loss_bw={row['loss_bw']:.4f}  "
                f"ppl_fw={row['ppl_fw']:.3f}  ppl_bw={row['ppl_bw']:.3f}")
    return rows


def evaluate_checkpoint(path, split="val", n_batches=None, batch_size=None, data_dir=None, device="cpu",
                        log=print):
    ckpt_file = checkpoint_path(path)
    model, ckpt = load_model(ckpt_file, device=device)
    if not hasattr(model, "keep_first_blocks"):
        raise CheckpointError(f"{ckpt_file} holds a {ckpt.get('model_name')} model; layer cuts need "
                              f"dual_mask_gpt")
    tokenizer_of(model, ckpt, ckpt_file)  # every token id has a row
    run_config = ckpt["config"]
    for key, kind in RUN_SETTINGS.items():  # a checkpoint edited by hand or written by another program
        if not isinstance(run_config.get(key), kind):
            raise CheckpointError(f"{ckpt_file} has no usable '{key}' (a {kind.__name__}) in its run settings, which "
                                  f"the validation batches need; use a checkpoint written by train_dual_mask_gpt.py")
    num_params = model.num_params()
    n_layer = len(model.blocks)
    batches = validation_batches(run_config, split, n_batches, batch_size, data_dir)
    if log:
        log(f"{ckpt_file}: {n_layer} blocks, {num_params:,} parameters, {len(batches)} {split} batches")
    cuts = layer_cut_curve(model, batches, device, log)
    return {"checkpoint": os.path.abspath(ckpt_file), "step": ckpt.get("step"), "n_layer": n_layer,
            "num_params": num_params, "split": split, "batches": len(batches),
            "tokens": sum(int(b[0].numel()) for b in batches), "cuts": cuts}


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders (with checkpoint.pt) or checkpoint files")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--batches", type=cli.positive_int, default=None,
                   help="validation batches per cut (default: the run's --eval-batches, the batches of its val rows)")
    p.add_argument("--batch-size", type=cli.positive_int, default=None, help="default: the run's micro batch size")
    p.add_argument("--data-dir", default=None, help="default: the run's data_dir")
    p.add_argument("--device", type=cli.device, default="cpu", help="cpu (default), auto, cuda, cuda:N, mps")
    p.add_argument("--out", type=cli.output_file, default=None, help=f"output file (one path only); default <run dir>/{CUTS_FILE}")
    p.add_argument("--skip-existing", action="store_true", help=f"skip runs that already have {CUTS_FILE}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    args.device = cli.pick_device(args.device)
    if args.out and len(args.paths) > 1:
        p.error("--out takes a single path")
    outs = [args.out or os.path.join(os.path.dirname(checkpoint_path(path)) or ".", CUTS_FILE) for path in args.paths]
    existing = [o for o in outs if os.path.exists(o)]
    if existing and not (args.overwrite or args.skip_existing):
        print(f"error: {existing[0]} already exists; add --overwrite to replace it, --skip-existing to keep it, or "
              f"choose another --out", file=sys.stderr)
        return 2
    failed = 0
    for path in args.paths:
        out = args.out or os.path.join(os.path.dirname(checkpoint_path(path)) or ".", CUTS_FILE)
        if args.skip_existing and os.path.exists(out):
            print(f"skip {path}: {out} exists")
            continue
        try:
            result = evaluate_checkpoint(path, args.split, args.batches, args.batch_size, args.data_dir,
                                         args.device)
        except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            atomic_write_bytes(out, json.dumps(result, indent=1).encode("utf-8"))  # never half a file
        except OSError as e:  # e.g. a full disk
            print(f"error: could not write {out} ({e.strerror or e}); no file was changed: free some space or "
                  f"choose another --out", file=sys.stderr)
            failed += 1
        else:
            print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
