"""`listener demo`: stores arriving at different times, served fairly, shown live."""
