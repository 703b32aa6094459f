"""`python -m epc ...`: the same as the `epc` command."""
from epc.cli import main

if __name__ == "__main__":
    main()
