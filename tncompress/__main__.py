"""``python -m tncompress``: the ``tncompress`` command (the form torchrun's ``-m`` starts)."""
from tncompress.cli import main

main()
