"""`python -m ravine ...` runs the `ravine` command."""

from ravine.cli import main

if __name__ == "__main__":
    main()
