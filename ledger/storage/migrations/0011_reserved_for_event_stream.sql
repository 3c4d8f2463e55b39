-- Reserved: migration 0011 is the event stream's outbox (issue 20, built on main
-- at the same time). This placeholder keeps the numbers 1..n on this branch;
-- the merge replaces it with that migration.
SELECT 1;
