"""Commands: the ``sdtune`` command line.

``cli`` builds the parser and turns a ``SdtuneError`` into one line and a non-zero exit; each
subcommand lives in its own module (``add_parser`` + ``run``) and imports the library lazily, so
``sdtune --help`` never pays for torch: ``infer``, ``inspect``, ``train`` (its arguments are the recipe's own,
``sdtune.training.launch``), ``config`` (the shipped configs), ``eval``, ``demo`` and ``ui``; ``__main__`` is
``python -m sdtune``. May import every other sdtune package; nothing imports it.
"""
