FROM python:3.11-slim
WORKDIR /app
RUN useradd --create-home --uid 10001 ferry

# Dependencies first, from the project metadata alone: this layer is rebuilt only when
# pyproject.toml changes, not on every code change. (Empty packages stand in for the source.)
COPY pyproject.toml README.md ./
RUN mkdir api worker shared fakeprovider \
 && touch api/__init__.py worker/__init__.py shared/__init__.py fakeprovider/__init__.py \
 && pip install --no-cache-dir . \
 && pip uninstall --yes ferry

COPY api api
COPY worker worker
COPY shared shared
COPY fakeprovider fakeprovider
COPY migrations migrations
RUN pip install --no-cache-dir --no-deps -e .

USER ferry
EXPOSE 8080
CMD ["ferry", "api"]
