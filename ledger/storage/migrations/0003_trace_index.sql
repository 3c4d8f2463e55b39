-- Finds the transfers one trace recorded ("which postings did trace X make").
CREATE INDEX transfers_by_trace ON transfers (trace_id) WHERE trace_id <> '';
