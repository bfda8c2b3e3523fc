"""accelerate config files for `accelerate launch --config_file ...` (README, "Scale out")."""
