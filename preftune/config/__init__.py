"""Configuration: every option of a run as a dataclass field with its help, choices and range (values);
YAML files (yaml); TRL's option names (trl_names); TrainConfig and EvalConfig built from them."""
