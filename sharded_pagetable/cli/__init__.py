"""The command line: ``python -m sharded_pagetable demo|info`` and its device checks."""
