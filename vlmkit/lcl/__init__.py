"""Link-context learning, an experiment built on vlmkit's plug-in contract: 2-way episodes from
class folders (:mod:`.episodes`, hard negatives from :mod:`.neighbours`), the synthetic ISEKAI-like
concepts (:mod:`.synthetic_concepts`), its template (:mod:`.template`) and evaluators
(:mod:`.evaluators`). :mod:`.plugin` gives recipes ``${lcl_data}`` and the "strategy mix" check."""
