"""`python -m tinygpt_cli` (also what torchrun launches)."""

from tinygpt_cli.cli import main

if __name__ == "__main__":
    main()
