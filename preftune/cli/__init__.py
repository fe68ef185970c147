"""The command line: argument parsing only; every command calls into the layers below."""
