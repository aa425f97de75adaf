"""The application layer: options, tasks, the run skeleton, the commands and the demo (``capsparse.cli`` parses
flags into these). Import the submodules directly; nothing here is imported with ``capsparse``."""
