"""Configuration: every option of a run as a dataclass field with its help, choices and range; YAML files; TRL's option names."""
