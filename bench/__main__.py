"""`python -m bench` (or `make bench`): speed and memory of the engine on a full-size random BlenderBot-400M."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
