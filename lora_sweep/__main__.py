"""`python -m lora_sweep`: see `lora_sweep.cli`."""

from lora_sweep.cli import main

if __name__ == "__main__":
    main()
