"""Hyperparameter studies: study files, search spaces, the Tune trainable, MLflow tracking.

Entry points: :func:`s2study.study.config.load_study` (validated :class:`StudyConfig`) and
:func:`s2study.study.runner.run_study`; the CLI is ``s2study run`` / ``s2study report``
(:mod:`s2study.study.commands`). Importing this package imports neither Ray nor MLflow.
"""
