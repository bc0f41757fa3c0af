"""Study and sweeper logic behind the Hydra sweeper plugin (unit-testable without Hydra discovery)."""
