"""The ``lit`` command and its subcommands: the top floor of the suite.

Everything here assembles the layers below (``lit`` core < ``models`` < ``datamodules``
< ``callbacks``) into commands: the ``lit`` command (:mod:`lit.commands.cli`; its LightningCLI
in :mod:`lit.commands.lightning_cli`), ``lit export``, ``lit report`` (Table 1), ``lit scan``
and extraction into feature stores. Nothing below
imports from here (``tests/test_layers.py``).
"""
