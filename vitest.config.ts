import { defineConfig } from 'vitest/config';

/**
 * Two projects. `main`: unit, engine and integration tests, files in parallel, sharing one set
 * of real services started by the global setup. `reliability`: failure and soak tests that kill
 * processes and restart Redis and Postgres; each file starts its own services, and files run one
 * at a time so their timings are not disturbed by the rest of the suite (`npm test` runs it after
 * `main`).
 */
export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    projects: [
      {
        extends: true,
        test: {
          name: 'main',
          include: ['tests/{unit,engine,integration}/**/*.test.ts'],
          globalSetup: ['tests/support/global-setup.ts'],
        },
      },
      {
        extends: true,
        test: {
          name: 'reliability',
          include: ['tests/reliability/**/*.test.ts'],
          fileParallelism: false,
          testTimeout: 600_000,
          // The soak measures heap after full collections (global.gc).
          execArgv: ['--expose-gc'],
        },
      },
    ],
  },
});
