"""The MMU proper: SPTE tables, the TDP MMU, the shadow MMU."""
