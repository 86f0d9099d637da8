"""``python -m pss_cli``."""

from pss_cli.app import main

if __name__ == "__main__":
    main()
