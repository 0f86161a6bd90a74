"""Run the qprompt CLI from a checkout: `python cli.py --help` (installed, it is `qprompt`)."""

from qprompt.cli import main

if __name__ == "__main__":
    main()
