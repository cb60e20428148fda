"""Real retrieval sets with their official protocols: revisited Oxford/Paris, CUB-200-2011,
GPR1200 and INSTRE, and the layout checks and loaders they share (:mod:`.common`)."""
