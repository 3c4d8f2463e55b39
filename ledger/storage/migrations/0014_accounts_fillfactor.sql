-- Every transfer updates its accounts' rows, and a row with velocity counters is
-- about 1.2 KB (six to a page). With full pages an update rarely found room on
-- its own page: in bench/velocity_cost.py only a third of the updates of limited
-- accounts were HOT, and each of the others wrote a new page and an index entry
-- (the table grew 90-fold in 15 s). Half-full pages keep room for the next
-- version, which HOT pruning then reclaims. Pages written from now on.
ALTER TABLE accounts SET (fillfactor = 50);
