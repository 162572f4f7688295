"""
Research tools of one model, dual_mask_gpt (models/dual_mask_gpt.py):

    python dual_mask/sweep.py ...        a depth x width x p_bw x seed grid of runs, resumable
    python dual_mask/layer_cuts.py RUN   fw/bw loss after removing blocks from the back
    python dual_mask/analyze.py SWEEP    plots and ratios of a sweep
"""
