from graphpass.cli import main

raise SystemExit(main())
