"""Operations that keep the instance healthy: housekeeping and the run reaper."""
