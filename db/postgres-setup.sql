-- PostgreSQL for autoprune on a cluster: one role, three databases (never one database for two stores:
-- Optuna, MLflow and autoprune each keep their own schema-version table and refuse the others' tables).
--
--   psql -h DBHOST -U postgres -v password="'CHANGE-ME'" -f db/postgres-setup.sql
--
-- then, in the search config (the password can come from the environment instead: see README, "Run on a cluster"):
--   study:    {storage: "postgresql+psycopg://autoprune:CHANGE-ME@DBHOST:5432/autoprune_optuna",
--              db_url:  "postgresql+psycopg://autoprune:CHANGE-ME@DBHOST:5432/autoprune"}
--   tracking: {uri:     "postgresql+psycopg://autoprune:CHANGE-ME@DBHOST:5432/autoprune_mlflow"}
-- and create autoprune's tables once:  autoprune db upgrade CONFIG
-- (Optuna and MLflow create their own tables on first use.)

\set ON_ERROR_STOP on
CREATE ROLE autoprune LOGIN PASSWORD :password;
CREATE DATABASE autoprune_optuna OWNER autoprune ENCODING 'UTF8';
CREATE DATABASE autoprune_mlflow OWNER autoprune ENCODING 'UTF8';
CREATE DATABASE autoprune OWNER autoprune ENCODING 'UTF8';
