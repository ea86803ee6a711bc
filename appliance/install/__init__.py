"""The installed appliance: releases under a prefix, activation, rollback, install records."""
