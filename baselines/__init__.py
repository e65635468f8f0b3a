"""The editors LocFT-BF is compared with, on this project's decoder, in pure PyTorch.

    locate.py     the subject's last token, context templates, keys and target values v*
    cov.py        C0 = E[k k^T] of down_proj inputs over a text corpus, cached on disk
    hparams.py    the official hyper-parameters per model family, and the rule for other models
    memit.py      MEMIT and RECT (MEMIT's update kept at the largest relative changes)
    alphaedit.py  AlphaEdit (MEMIT's update projected onto C0's near-null space)
    ultraedit.py  UltraEdit (keys and output gradients at answer tokens, lifelong normalisation)
    ft_l.py       FT-L (fine-tuning one down_proj on the last prompt position)
    run.py        the command line: sequential editing in batches, the same outputs as edit.py

The core files never import this package; it imports them.
"""
