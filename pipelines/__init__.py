"""Prefect flows and the ``percival`` command line.

Importing this package first applies Percival's Prefect defaults (see :mod:`pipelines.prefect_env`), before
any flow module imports ``prefect``.
"""

from pipelines import prefect_env

prefect_env.configure()
