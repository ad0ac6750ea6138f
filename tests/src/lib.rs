//! Helpers for the integration tests: start and stop real agent processes.
