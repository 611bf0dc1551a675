"""Operations across adapters: promotion with its serving check and revert, approval, rollback."""
