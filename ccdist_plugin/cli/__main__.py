"""``python -m ccdist_plugin.cli`` (what ``torchrun -m ccdist_plugin.cli`` runs)."""

from ccdist_plugin.cli import main

if __name__ == "__main__":
    main()
