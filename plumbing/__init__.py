"""
Plumbing a learner may skip: what makes the scripts robust, not what makes the models learn.

    cli.py              one-line errors and checked numbers for every script's command line
    trainer_config.py   the training scripts' flags, presets and how a run's settings are resolved
    trainer_console.py  what the trainer tells the user (--help per preset, CPU threads, ETA)
    run_folder.py       the run folder: one writer at a time, atomic writes, --overwrite only after validation
    speed.py            speed on a GPU: auto micro batch, torch.compile, MFU, prefetch
    ctrl_c.py           Ctrl-C during start-up is one line, exit 130
"""
