"""``python -m tncompress.cli``: the same as the ``tncompress`` command."""
from tncompress.cli import main

main()
